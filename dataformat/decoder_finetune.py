"""Where the temporal VAE decoder finetune of an image-to-video stage writes its report, beside the stage's
pipeline (the finetuned decoder itself replaces `pipeline/vae`):

  STAGE/decoder/summary.json          steps, settings, first/last losses, the probe clip's L1/LPIPS before and after
  STAGE/decoder/metrics.jsonl         one JSON line per step: every loss term, adaptive weights, logits
  STAGE/decoder/reconstructions.png   the probe clip: input frames, the decoder's reconstruction before the
                                      finetune and after it, one row each, frames left to right
  STAGE/decoder/losses.png            the loss terms per step
"""

from __future__ import annotations

from pathlib import Path


class DecoderFinetuneLayout:
    """The decoder finetune's report files under `stage_dir/decoder`."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.root = Path(stage_dir) / "decoder"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def reconstructions(self) -> Path:
        return self.root / "reconstructions.png"

    @property
    def loss_plot(self) -> Path:
        return self.root / "losses.png"
