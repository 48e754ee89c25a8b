"""Memory per GPU of SimMIM pretraining under DDP and --fsdp, for the README's table.

    python tools/memory.py                  # Swin-B, SwinV2-H, SwinV2-G at 192px; 8, 16, 64 GPUs
    python tools/memory.py --models swinv2_huge --img-size 224 --gpus 8

Weights, gradients and AdamW state come from the parameter counts: float32 weights (4 bytes a
parameter), gradients (4) and two AdamW moments (8); DDP holds all of them on every GPU, FSDP a
1/N share plus the unsharded bf16 weights and gradients of the blocks being computed (the largest
block, twice: one computing, one prefetched). Activations are measured on the CPU: the bytes of
the tensors the forward of a bf16-autocast model saves for its backward (autograd's saved-tensor
hooks), at batches 1 and 2 (what one more image adds: the bf16 copies of the weights do not grow
with the batch), for models of one and two blocks per stage (so a block's share is known), scaled
to the model's depths and to the batch. With --use-checkpoint only the blocks' inputs
stay, plus one block's activations during its backward. Allocator slack, the data loader and
CUDA's own memory are not counted.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import models  # noqa: E402

GB = 2 ** 30


def saved_bytes(name, depths, img_size, checkpointing, batch=1):
    """Bytes saved for the backward by one forward of a SimMIM model (bf16 autocast)."""
    torch.manual_seed(0)
    model = models.build_simmim(name, img_size=img_size, depths=depths,
                                use_checkpoint=checkpointing).train()
    models.use_fused_attention(model, False)
    masks = data.MaskGenerator(img_size, 32, model.patch_size, 0.6)
    x, mask = torch.randn(batch, 3, img_size, img_size), torch.stack([masks() for _ in range(batch)])
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x, mask)
    return total[0]


def measured(*args):
    """saved_bytes(*args) in a process of its own: freed memory comes back whole to the next."""
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(saved_bytes, *args).result()


def per_image(name, depths, img_size, checkpointing):
    return (measured(name, depths, img_size, checkpointing, 2)
            - measured(name, depths, img_size, checkpointing, 1))


def activations(name, img_size, checkpointing):
    """(bytes an image keeps for the backward over the whole model, the largest block's)."""
    depths = models.MODELS[name]['depths']
    ones = (1,) * len(depths)
    base = per_image(name, ones, img_size, checkpointing)
    per_block = []
    for stage in range(len(depths)):
        two = tuple(2 if i == stage else 1 for i in range(len(depths)))
        per_block.append(per_image(name, two, img_size, checkpointing) - base)
    fixed = base - sum(per_block)
    total = fixed + sum(d * b for d, b in zip(depths, per_block))
    if checkpointing:  # one block's activations are back during its backward
        total += max(activations(name, img_size, False)[1], 0)
    return total, max(per_block)


def block_params(model):
    return max(sum(p.numel() for p in block.parameters()) for block in models.blocks(model))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['swin_base', 'swinv2_huge', 'swinv2_giant'])
    p.add_argument('--img-size', type=int, default=192)
    p.add_argument('--gpus', type=int, nargs='+', default=[8, 16, 64])
    return p


def main(args):
    rows = {'weights, gradients, AdamW: DDP': [],
            f"the same, FSDP on {' / '.join(map(str, args.gpus))} GPUs": [],
            f'activations per image, {args.img_size}px, bf16 (with --use-checkpoint)': []}
    names = []
    for name in args.models:
        with torch.device('meta'):
            model = models.build_simmim(name, img_size=args.img_size)
        count = sum(p.numel() for p in model.parameters())
        names.append(f"{name} ({count / 1e6:,.0f}M)")
        state = 16 * count
        unsharded = 2 * 2 * 2 * block_params(model)  # bf16 weights and gradients, two blocks
        plain, checkpointed = (activations(name, args.img_size, c)[0] for c in (False, True))
        values = list(rows.values())
        values[0].append(f"{state / GB:.1f} GB")
        values[1].append(' / '.join(f"{(state / n + unsharded) / GB:.2f}" for n in args.gpus) + ' GB')
        values[2].append(f"{plain / 2 ** 20:,.0f} MB ({checkpointed / 2 ** 20:,.0f} MB)")
    print('| per GPU | ' + ' | '.join(names) + ' |')
    print('| --- |' + ' ---: |' * len(names))
    for label, values in rows.items():
        print(f"| {label} | " + ' | '.join(values) + ' |')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
