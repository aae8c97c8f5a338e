"""Checkpoint loading that names the file at fault and survives a damaged last checkpoint.

:class:`Checkpointer` is detectron2's ``DetectionCheckpointer`` except that

- a file that cannot be read (truncated, random bytes, not a checkpoint at all) raises
  :class:`CheckpointError` naming it, instead of torch's unpickling errors (whose advice to pass
  ``weights_only=False`` is wrong for a damaged file);
- ``resume_or_load(..., resume=True)`` tries the checkpoint named in ``last_checkpoint``, then the
  other checkpoints the periodic checkpointer wrote (``model_final.pth``, then ``model_NNNNNNN.pth``
  from the newest), and logs which damaged file it skipped; ``last_checkpoint`` itself may be
  damaged (e.g. binary content).
"""
import os
import re
from collections.abc import Mapping

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CheckpointError", "Checkpointer"]

_PERIODIC_NAME = re.compile(r"model_(\d+|final)\.pth")


class CheckpointError(RuntimeError):
    """A checkpoint file (named in the message) cannot be used."""


def _reason(error):
    """The informative last line of a loading error (torch puts its generic advice first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}"


class Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with errors that name the file and a resume fallback (module doc)."""

    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # detectron2 main resets this only after a successful load; a failed one would make
            # the fallback's next load() trip its assertion.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # torch.load/pickle raise many types for damaged or foreign files
            raise CheckpointError(
                f"Cannot read checkpoint file {filename}: it is damaged (e.g. truncated by a killed "
                f"job) or not a PyTorch/detectron2 checkpoint ({_reason(e)})"
            ) from e
        if not isinstance(loaded.get("model"), Mapping):
            raise CheckpointError(
                f"Checkpoint file {filename} holds no model state dict (found "
                f"{type(loaded.get('model')).__name__} under 'model'): not a detectron2 checkpoint"
            )
        return loaded

    def get_checkpoint_file(self):
        """The checkpoint named in ``last_checkpoint`` ("" if there is none)."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with self.path_manager.open(tag, "rb") as f:
                name = f.read().decode("utf-8").strip()
        except OSError:
            return ""  # removed meanwhile, as detectron2 allows
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{tag} is damaged: it should hold a checkpoint file name ({e})") from e
        if not name or os.sep in name:
            raise CheckpointError(f"{tag} is damaged: it should hold a checkpoint file name, got {name!r}")
        return os.path.join(self.save_dir, name)

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        tried = []
        for candidate in self._resume_candidates():
            if not os.path.isfile(candidate):
                self.logger.warning(f"Resume: checkpoint file {candidate} does not exist.")
                tried.append(candidate)
                continue
            try:
                loaded = self.load(candidate)
            except CheckpointError as e:
                self.logger.warning(f"Resume: {e}. Falling back to the previous checkpoint.")
                tried.append(candidate)
                continue
            if tried:
                self.logger.warning(f"Resumed from {candidate} instead of the damaged {', '.join(tried)}.")
            return loaded
        raise CheckpointError(
            f"--resume: no readable checkpoint in {self.save_dir} (tried {', '.join(tried) or 'none'}); "
            "start without --resume or restore a checkpoint"
        )

    def _resume_candidates(self):
        """The tagged checkpoint (if the tag is readable), then the periodic ones, newest first."""
        try:
            tagged = [self.get_checkpoint_file()]
        except CheckpointError as e:
            self.logger.warning(f"Resume: {e}.")
            tagged = []
        periodic = [
            os.path.join(self.save_dir, name)
            for name in sorted(
                (n for n in self.path_manager.ls(self.save_dir) if _PERIODIC_NAME.fullmatch(n)),
                key=lambda n: (n == "model_final.pth", n), reverse=True,
            )
        ]
        return [c for c in tagged if c] + [c for c in periodic if c not in tagged]
