"""Runs one small training through the engine in its own process, for the durability tests.

    python tests/train_driver.py RUN_DIR [--resume] [--steps N] [--checkpoint-every K]
                                 [--model transformer|resnet_bk] [--batch-size B] ...

Prints the outcome as one JSON line. Launched under torchrun it trains with DDP; for ResNet-BK
the line also lists, per rank, the training steps in which some expert received no token.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_corpus  # noqa: E402

from bkbench.config import BenchmarkConfig  # noqa: E402
from bkbench.models import build_model  # noqa: E402
from bkbench.train import Trainer, TrainingInterrupted, init_distributed, seed_everything  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--model", choices=["transformer", "resnet_bk"], default="transformer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--signal-in-test-eval", type=int, default=None,
                        help="send this signal to itself when the test evaluation starts")
    args = parser.parse_args()

    torch.set_num_threads(1)
    distributed = init_distributed("cpu")
    corpus = make_corpus(n_train=6000)
    config = BenchmarkConfig(
        model_name=f"{args.model}_driver", d_model=args.d_model, n_layers=1, n_heads=2, n_seq=16,
        batch_size=args.batch_size, num_experts=args.num_experts, epochs=0,
        max_steps=args.steps, lr=3e-3, warmup_steps=2,
        eval_batch_size=16, seed=args.seed, dropout=args.dropout,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=2).validate()
    seed_everything(config.seed)
    model = build_model(args.model, len(corpus.vocab), **config.model_kwargs())
    idle_steps = []   # training forwards of this rank in which some expert got no token
    if args.model == "resnet_bk":
        forwards = [0]

        def record(moe, _inputs, _output):
            if moe.training:
                forwards[0] += 1
                if (moe.last_counts == 0).any():
                    idle_steps.append(forwards[0])

        for block in model.blocks:
            block.moe.register_forward_hook(record)
    trainer = Trainer(config, model, corpus, torch.device("cpu"), run_dir=args.run_dir,
                      resume=args.resume, data_fingerprint={"corpus": "synthetic"},
                      progress=False)
    if args.signal_in_test_eval is not None:
        validate = trainer._validate

        def signalled(split):
            if split is corpus.test:
                os.kill(os.getpid(), args.signal_in_test_eval)
            return validate(split)
        trainer._validate = signalled
    try:
        out = trainer.fit()
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    idle_by_rank = [idle_steps]
    if distributed:
        idle_by_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(idle_by_rank, idle_steps)
    if not distributed or torch.distributed.get_rank() == 0:
        print(json.dumps({"idle_expert_steps": idle_by_rank,
                          "step_losses": out.step_losses, "valid_loss": out.valid.loss,
                          "test_loss": out.test.loss, "test_tokens": out.test.num_tokens,
                          "valid_tokens": out.valid.num_tokens, "epoch_losses": out.epoch_losses,
                          "steps": out.steps, "resumed_from_step": out.resumed_from_step}))
    if distributed:
        # no rank tears gloo down while another is still in the all_gather above: that
        # aborted rank 1 ("terminate called without an active exception") in 4 of 9 runs
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # everything is written and the group destroyed: skip the interpreter's teardown, where
    # gloo's threads still abort now and then ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
