"""The progress bar of the training loops bounded by steps (the demo pair, the tuning stage)."""
from lightning.pytorch.callbacks import RichProgressBar


class StepsProgressBar(RichProgressBar):
    """Lightning's default bar (rich), less two things that mean nothing to a user:
    - "Epoch 2/-2": a fit bounded by max_steps has max_epochs=-1, which Lightning's bar prints
      as a last epoch of -2; the bar's own count (126/126) and the step limit in the log line
      before it already say how far the fit is;
    - "v_num: 0": the logger's version number (Lightning's documented get_metrics override)."""

    # a private hook of RichProgressBar: were it renamed, the stock description would come back, nothing breaks
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
