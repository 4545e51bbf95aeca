"""The one-worker reference of a stage run, trained in this process without Ray.

Ray Train runs with several workers must end where one worker with the whole global batch ends; computing
that one worker here (the same loader, trainer and export code a Ray worker runs, on one thread as a
1-CPU Ray worker has) keeps each comparison to the Ray runs it is really about.
"""

from __future__ import annotations

import contextlib

import torch

from dataformat import index_shards
from model.loading import load_initial_pipeline
from training.data import TrainingStream
from training.loop import group_steps
from training.request import StageRunRequest
from training.trainer import StageTrainer


@contextlib.contextmanager
def one_thread():
    """Torch on one thread (a 1-CPU Ray worker), restored afterwards for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_in_process(request: StageRunRequest) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train `request`'s stage on one worker in this process: (exported U-Net weights, first/last loss) as
    `run_stage` reports them."""
    preset, shards, init = request.resolve()
    image_encoder = request.image_encoder or ("tiny" if preset.preset == "tiny" else None)
    micro_batch_size = request.micro_batch_size or max(phase.batch_size for phase in preset.phases)
    with one_thread():
        torch.manual_seed(request.seed)
        pipeline = load_initial_pipeline(init, request.seed, preset.conditioning, image_encoder)
        trainer = StageTrainer(pipeline, preset, seed=request.seed, micro_batch_size=micro_batch_size)
        stream = TrainingStream(index_shards(shards), preset, request.seed, 0, 1, micro_batch_size)
        losses = [trainer.train_step(micro_batches)["loss"] for micro_batches in group_steps(stream)]
        weights = {k: v.detach().clone() for k, v in trainer.export_unet().state_dict().items()}
    return weights, {"first": losses[0], "last": losses[-1]}
