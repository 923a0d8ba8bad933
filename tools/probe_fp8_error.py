"""How far the SD-1.5 U-Net's guided step moves from its float32 output in bf16, and in bf16 with FP8 transformer
linears (`ldm.models.float8`): the same-results contract asks whether FP8 stays within bf16's own error. Random
weights (nowhere zero), batch 2, one timestep; relative L2 of the output. Prints one JSON line.

    python tools/probe_fp8_error.py --cpu --latent 32   # the full U-Net on the CPU (FP8 products emulated: minutes)
    python tools/probe_fp8_error.py                     # GPU (Ada/Hopper)
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.bench.models import guided_step_inputs, relative_l2, sd15_unet  # noqa: E402
from ldm.models.float8 import to_float8  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--latent", type=int, default=64, help="latent size (64: a 512 px image)")
    p.add_argument("--timesteps", type=float, nargs="+", default=[101.0, 501.0, 901.0])
    p.add_argument("--tiny", action="store_true", help="toy-width U-Net (the plumbing)")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    reference = sd15_unet(device, torch.float32, tiny=args.tiny)
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    converted = to_float8(fp8)
    x, _, c = guided_step_inputs(reference, args.latent, device, torch.float32)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "latent": args.latent, "fp8_linears": converted, "by_timestep": {}}
    with torch.no_grad():
        for step in args.timesteps:
            t = torch.full((2,), step, device=device)
            exact = reference(x, t, context=c)
            low = {name: net(x.bfloat16(), t, context=c.bfloat16()) for name, net in (("bf16", bf16), ("fp8", fp8))}
            out["by_timestep"][str(int(step))] = {"bf16_vs_fp32": relative_l2(low["bf16"], exact),
                                                  "fp8_vs_fp32": relative_l2(low["fp8"], exact),
                                                  "fp8_vs_bf16": relative_l2(low["fp8"], low["bf16"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
