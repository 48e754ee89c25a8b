"""Repeated SIGKILL test of pretrain.py (not part of the test suite; a few minutes on a laptop CPU).

    python tools/killtest.py --kills 12

Trains a tiny model on generated images once without interruption, then again with a checkpoint after every step
(--save-steps 1) while killing it with SIGKILL at random moments, half of them the instant a checkpoint is being
written, restarting the same command after each kill. Prints how many kills the run survived and whether its final
weights equal the uninterrupted run's, tensor for tensor.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the scripts


def command(data_path, output):
    return [sys.executable, os.path.join(ROOT, 'pretrain.py'), '--model', 'swin_tiny', '--img-size', '64',
            '--mask-patch-size', '16', '--embed-dim', '16', '--depths', '1', '1', '2', '1', '--data-path', data_path,
            '--batch-size', '4', '--num-workers', '0', '--epochs', '80', '--warmup-epochs', '1', '--base-lr', '0.5',
            '--save-steps', '1', '--print-freq', '1000', '--amp', 'off', '--output', output]


def writing(tmp, since):
    """A temporary checkpoint file written by this process (not one left over by a killed one)."""
    try:
        return os.stat(tmp).st_mtime > since
    except FileNotFoundError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--kills', type=int, default=12, help='SIGKILLs to deliver before letting the run finish')
    p.add_argument('--seed', type=int, default=0, help='seed of the kill times')
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix='killtest_')
    data_path = os.path.join(work, 'data')
    os.makedirs(data_path)
    pixels = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(pixels.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(os.path.join(data_path, f'{i}.png'))

    start = time.time()
    subprocess.run(command(data_path, os.path.join(work, 'reference')), check=True, capture_output=True)
    reference_time = time.time() - start
    print(f"uninterrupted run: {reference_time:.1f}s")

    output = os.path.join(work, 'killed')
    kills, resumed = 0, 0
    while True:
        log = open(os.path.join(work, f'run{kills}.log'), 'w')
        proc = subprocess.Popen(command(data_path, output), stdout=log, stderr=subprocess.STDOUT)
        if kills < args.kills:
            at_save = kills % 2 == 1
            launched = time.time()
            deadline = launched + rng.uniform(2.5, 6.0)  # start-up takes about 2 s
            while proc.poll() is None and time.time() < deadline:
                if at_save and writing(os.path.join(output, 'checkpoint.pth.tmp'), launched):
                    break  # a checkpoint is being written right now
                time.sleep(0.001)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                print(f"kill {kills}: {'while writing a checkpoint' if at_save else 'at a random moment'}")
                continue
        proc.wait()
        log.close()
        if proc.returncode != 0:
            sys.exit(f"the restarted run failed (exit {proc.returncode}); see {log.name}")
        break
    for name in os.listdir(work):
        if name.startswith('run') and 'resumed from' in open(os.path.join(work, name)).read():
            resumed += 1

    a = torch.load(os.path.join(work, 'reference', 'checkpoint.pth'), weights_only=True)
    b = torch.load(os.path.join(output, 'checkpoint.pth'), weights_only=True)
    same = a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    print(f"survived {kills} SIGKILLs ({resumed} restarts resumed from a checkpoint); final weights identical to the "
          f"uninterrupted run: {same} (epoch {b['epoch']}, step {b['step']}); files in {work}")
    sys.exit(0 if same else 1)


if __name__ == '__main__':
    main()
