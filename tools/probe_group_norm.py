"""A/B of GroupNorm32 in half precision: PyTorch's own kernel (the default since run 7) against the explicit float32
casts it replaced, on the SD-1.5 U-Net's guided step (batch 2, 64x64 latents, bf16), eager and compiled
(reduce-overhead), the two networks timed in alternation in one process; and how far each is from the same
network in float32 (relative L2 of the step's output: bf16's own error, the scale to read their difference on).
Prints one JSON line.

    python tools/probe_group_norm.py                           # GPU
    python tools/probe_group_norm.py --cpu --latent 32         # the full U-Net on the CPU, eager only (minutes)
    python tools/probe_group_norm.py --tiny --cpu --latent 8   # the plumbing
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.bench.models import guided_step_inputs, relative_l2, sd15_unet  # noqa: E402
from ldm.bench.timing import alternate  # noqa: E402
from ldm.models.unet_blocks import GroupNorm32  # noqa: E402
from ldm.pipeline.fast import fast_network  # noqa: E402


class CastGroupNorm32(GroupNorm32):
    """The casts GroupNorm32 ran before run 7: input and parameters to float32, the output back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy-width U-Net")
    p.add_argument("--cpu", action="store_true", help="run on the CPU, eager only")
    p.add_argument("--latent", type=int, default=64, help="latent size (64: a 512 px image)")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    reference = sd15_unet(device, torch.float32, tiny=args.tiny)
    kernel = copy.deepcopy(reference).to(torch.bfloat16)
    casts = copy.deepcopy(kernel)
    swapped = 0
    for m in casts.modules():
        if type(m) is GroupNorm32:
            m.__class__ = CastGroupNorm32
            swapped += 1
    x, t, c = guided_step_inputs(kernel, args.latent, device, torch.bfloat16)
    out = {"group_norms": swapped, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    with torch.no_grad():
        for net in (reference, kernel, casts):
            fast_network(net, mode=None)
        exact = reference(x.float(), t, context=c.float())
        del reference
        a, b = kernel(x, t, context=c).float(), casts(x, t, context=c).float()
        out.update(latent=args.latent, output_change=relative_l2(a, b), kernel_vs_fp32=relative_l2(a, exact),
                   casts_vs_fp32=relative_l2(b, exact))
        sides = {"kernel": lambda: kernel(x, t, context=c), "casts": lambda: casts(x, t, context=c)}
        out["eager_ms"] = alternate(sides, device, rounds=5, repeats=5)
        if device.type == "cuda":
            for net in (kernel, casts):
                net.compile(dynamic=False, mode="reduce-overhead")
            out["compiled_ms"] = alternate(sides, device, warmup=5, rounds=7, repeats=10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
