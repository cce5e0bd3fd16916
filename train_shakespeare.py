"""Train a standard or LCKV model on tiny Shakespeare and print a sample.

    python train_shakespeare.py                      # LCKV (w=2), the default ~10-minute CPU run
    python train_shakespeare.py --layers-kind standard
    python train_shakespeare.py --smoke              # seconds
    torchrun --nproc_per_node 2 train_shakespeare.py # data-parallel (gloo on CPU, nccl on GPU)

Every option: python train_shakespeare.py --help. The loop lives in lckv_mini/train.py.
"""

from lckv_mini.train import main

if __name__ == "__main__":
    main()
