/* saekit dashboard: heatmaps on latent pages, a sortable and filterable index.
   Plain JavaScript, no libraries, no network: the site opens from disk. */
(function () {
  "use strict";

  // ------------------------------------------------------------------ heatmaps
  // A canvas.heat holds one value per grid cell (data-v, row-major, data-h x data-w); it is drawn
  // at grid resolution and stretched over the thumbnail by CSS (pixelated).
  function drawHeatmaps() {
    var canvases = document.querySelectorAll("canvas.heat");
    for (var c = 0; c < canvases.length; c++) {
      var canvas = canvases[c];
      var h = parseInt(canvas.getAttribute("data-h"), 10);
      var w = parseInt(canvas.getAttribute("data-w"), 10);
      var values = canvas.getAttribute("data-v").split(",").map(Number);
      var max = parseFloat(canvas.getAttribute("data-max")) || 0;
      for (var i = 0; i < values.length; i++) { if (values[i] > max) { max = values[i]; } }
      canvas.width = w;
      canvas.height = h;
      var ctx = canvas.getContext("2d");
      var image = ctx.createImageData(w, h);
      for (var j = 0; j < values.length && j < w * h; j++) {
        var a = max > 0 ? Math.max(0, Math.min(1, values[j] / max)) : 0;
        // orange, opaque where the latent is strongest, clear where it is off
        image.data[4 * j] = 255;
        image.data[4 * j + 1] = Math.round(170 - 120 * a);
        image.data[4 * j + 2] = 0;
        image.data[4 * j + 3] = Math.round(160 * a);
      }
      ctx.putImageData(image, 0, 0);
    }
  }

  // ------------------------------------------------------------------ index
  var PAGE = 100;

  function formatNumber(value, kind) {
    if (value === null || value === undefined || (typeof value === "number" && isNaN(value))) {
      return "";
    }
    if (kind === "density") { return value === 0 ? "0" : value.toExponential(2); }
    if (kind === "float") { return value.toFixed(3); }
    return String(value);
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function renderIndex() {
    var data = window.SAEKIT_INDEX;
    var table = document.getElementById("latents");
    if (!data || !table) { return; }
    var columns = data.columns;
    var col = {};
    for (var i = 0; i < columns.length; i++) { col[columns[i]] = i; }
    var state = { key: "density", descending: true, page: 0, filter: "", liveOnly: false };
    var body = table.querySelector("tbody");
    var info = document.getElementById("page-info");

    function visible() {
      var needle = state.filter.toLowerCase();
      var rows = data.latents.filter(function (r) {
        if (state.liveOnly && !(r[col.density] > 0)) { return false; }
        if (!needle) { return true; }
        return (String(r[col.id]) + " " + (r[col.best] || "") + " " + (r[col.words] || ""))
          .toLowerCase().indexOf(needle) >= 0;
      });
      var k = col[state.key];
      var sign = state.descending ? -1 : 1;
      rows.sort(function (a, b) {
        var x = a[k], y = b[k];
        var xm = x === null || x === "" || (typeof x === "number" && isNaN(x));
        var ym = y === null || y === "" || (typeof y === "number" && isNaN(y));
        if (xm && ym) { return a[col.id] - b[col.id]; }
        if (xm) { return 1; }
        if (ym) { return -1; }
        if (x < y) { return -sign; }
        if (x > y) { return sign; }
        return a[col.id] - b[col.id];
      });
      return rows;
    }

    function draw() {
      var rows = visible();
      var pages = Math.max(1, Math.ceil(rows.length / PAGE));
      state.page = Math.min(state.page, pages - 1);
      while (body.firstChild) { body.removeChild(body.firstChild); }
      var shown = rows.slice(state.page * PAGE, (state.page + 1) * PAGE);
      for (var r = 0; r < shown.length; r++) {
        var item = shown[r];
        var tr = document.createElement("tr");
        if (!(item[col.density] > 0)) { tr.className = "dead"; }
        var idCell = cell(tr, "", "num");
        if (item[col.page]) {
          var link = document.createElement("a");
          link.href = item[col.page];
          link.textContent = String(item[col.id]);
          idCell.appendChild(link);
        } else {
          idCell.textContent = String(item[col.id]);
        }
        var thumbCell = cell(tr, "");
        if (item[col.thumb]) {
          var img = document.createElement("img");
          img.src = item[col.thumb];
          img.alt = "top input of latent " + item[col.id];
          img.loading = "lazy";
          thumbCell.appendChild(img);
        }
        cell(tr, formatNumber(item[col.density], "density"), "num");
        cell(tr, formatNumber(item[col.max], "float"), "num");
        cell(tr, formatNumber(item[col.mean], "float"), "num");
        cell(tr, formatNumber(item[col.inputs], "int"), "num");
        cell(tr, item[col.best] || "");
        cell(tr, formatNumber(item[col.auroc], "float"), "num");
        cell(tr, item[col.words] || "");
        body.appendChild(tr);
      }
      info.textContent = rows.length + " latents, page " + (state.page + 1) + " of " + pages;
      document.getElementById("prev").disabled = state.page === 0;
      document.getElementById("next").disabled = state.page >= pages - 1;
      var headers = table.querySelectorAll("th[data-key]");
      for (var h = 0; h < headers.length; h++) {
        var th = headers[h];
        th.className = th.getAttribute("data-key") === state.key
          ? (state.descending ? "sorted-desc" : "sorted-asc") : "";
      }
    }

    var headers = table.querySelectorAll("th[data-key]");
    for (var h = 0; h < headers.length; h++) {
      headers[h].addEventListener("click", function (event) {
        var key = event.currentTarget.getAttribute("data-key");
        if (state.key === key) { state.descending = !state.descending; }
        else { state.key = key; state.descending = key !== "id" && key !== "best" && key !== "words"; }
        state.page = 0;
        draw();
      });
    }
    document.getElementById("filter").addEventListener("input", function (event) {
      state.filter = event.target.value;
      state.page = 0;
      draw();
    });
    document.getElementById("live-only").addEventListener("change", function (event) {
      state.liveOnly = event.target.checked;
      state.page = 0;
      draw();
    });
    document.getElementById("prev").addEventListener("click", function () { state.page -= 1; draw(); });
    document.getElementById("next").addEventListener("click", function () { state.page += 1; draw(); });
    draw();
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawHeatmaps();
    renderIndex();
  });
})();
