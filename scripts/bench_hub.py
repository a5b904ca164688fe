"""Loading pretrained dictionaries of other formats: time and peak memory per format.

Each case writes one dictionary of the given size in its library's layout (random weights), then
loads it with ``saekit.load`` in a fresh process, several times; one JSON line per case:
``{"format", "d_in", "d_sae", "file_mb", "load_s" (median), "peak_rss_mb", "machine"}``.
``peak_rss_mb`` is the process's peak resident memory, imports included, so compare it with
``file_mb`` (the weights on disk).

    python scripts/bench_hub.py                      # every format at d_in=1024, d_sae=32768
    python scripts/bench_hub.py --d_in 1280 --d_sae 5120 --formats sdxl-unbox
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ["saekit", "saelens", "sparsify", "sdxl-unbox", "prisma"]


def write(fmt: str, folder: Path, d: int, m: int) -> None:
    """One dictionary in ``fmt``'s layout (see saekit/hub/formats/*.py for each)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, d, generator=g)
    b_enc, b_dec = torch.randn(m, generator=g), torch.randn(d, generator=g)
    folder.mkdir(parents=True)
    if fmt == "saekit":
        from saekit.dictionaries import SAEConfig, build_dictionary, save_dictionary

        sae = build_dictionary(SAEConfig(architecture="topk", k=32, d_sae=m).resolved(d))
        save_dictionary(sae, folder)
    elif fmt == "saelens":  # the folds saekit does for SAELens: no b_dec on input, rescaled TopK
        config = {
            "architecture": "topk",
            "d_in": d,
            "d_sae": m,
            "k": 32,
            "dtype": "float32",
            "apply_b_dec_to_input": False,
            "rescale_acts_by_decoder_norm": True,
            "normalize_activations": "none",
            "metadata": {"sae_lens_version": "6.0.0"},
        }
        (folder / "cfg.json").write_text(json.dumps(config))
        save_file(
            {"W_enc": W.T.contiguous(), "W_dec": W.clone(), "b_enc": b_enc, "b_dec": b_dec},
            folder / "sae_weights.safetensors",
        )
    elif fmt == "sparsify":
        (folder / "cfg.json").write_text(
            json.dumps({"activation": "topk", "num_latents": m, "k": 32, "d_in": d})
        )
        save_file(
            {"encoder.weight": W, "encoder.bias": b_enc, "W_dec": W.clone(), "b_dec": b_dec},
            folder / "sae.safetensors",
        )
    elif fmt == "sdxl-unbox":
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "n_dirs_local": m,
                    "d_model": d,
                    "k": 10,
                    "auxk": 256,
                    "dead_steps_threshold": 2441,
                }
            )
        )
        state = {
            "encoder.weight": W,
            "decoder.weight": W.T.clone(),
            "pre_bias": b_dec,
            "latent_bias": b_enc,
            "stats_last_nonzero": torch.zeros(m, dtype=torch.long),
        }
        torch.save({"state_dict": state}, folder / "state_dict.pth")
        torch.save(torch.rand(m), folder / "mean.pt")
        torch.save(torch.rand(m), folder / "std.pt")
    elif fmt == "prisma":
        if m % d:
            raise SystemExit("prisma needs d_sae to be a multiple of d_in (expansion_factor)")
        config = {
            "d_in": d,
            "expansion_factor": m // d,
            "architecture": "standard",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 32},
            "normalize_activations": "none",
            "hook_point_layer": 9,
            "layer_subtype": "hook_resid_post",
        }
        (folder / "config.json").write_text(json.dumps(config))
        torch.save(
            {"W_enc": W.T.contiguous(), "W_dec": W.clone(), "b_enc": b_enc, "b_dec": b_dec},
            folder / "weights.pt",
        )


def measure(folder: Path, repeats: int) -> dict:
    import saekit

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        saekit.load(folder, allow_pickle=True)
        times.append(time.perf_counter() - start)
    return {
        "load_s": round(statistics.median(times), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_in", type=int, default=1024)
    parser.add_argument("--d_sae", type=int, default=32768)
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.repeats)))
        return
    machine = (
        f"{platform.machine()} {torch.get_num_threads()}-thread CPU, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    for fmt in args.formats:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / fmt
            write(fmt, folder, args.d_in, args.d_sae)
            size = sum(p.stat().st_size for p in folder.iterdir())
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    str(folder),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            json.dumps(
                {
                    "format": fmt,
                    "d_in": args.d_in,
                    "d_sae": args.d_sae,
                    "file_mb": round(size / 2**20),
                    **result,
                    "machine": machine,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
