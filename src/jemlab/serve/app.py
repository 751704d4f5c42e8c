"""The demo's request logic, without HTTP: validate a JSON request, run one action, answer a JSON-ready dict.

Wire format of images: a flat list of C·H·W numbers in [0, 1] (row-major C, H, W; 0 = black), the layout of the
page's canvas after down-scaling. Every size, step count and frame count is bounded by ``Limits``; a request
outside them is a ``RequestError`` (HTTP 4xx) whose message names the field and the allowed range. The server
never reads a file named by a request: the checkpoint and the reference data are fixed at start-up.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from jemlab.serve.actions import ModelActions
from jemlab.typicality import Prediction, Reference, ood_reasons, percentiles

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status (4xx), the message is shown to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may cost (and the server's rate limit)."""

    max_body_bytes: int = 1 << 20  # 16 RGB 32×32 images as JSON floats fit with room to spare
    max_refine_steps: int = 200  # SGLD steps of one "refine"
    max_frames: int = 30  # animation frames returned by one "refine"
    max_chains: int = 16  # chains in one live-view request (per-class mode uses one per class, at most this)
    max_chain_steps: int = 50  # sampler steps per live-view request
    max_stored_chains: int = 8  # live views whose chain states the server keeps (diffusion models), oldest dropped
    requests_per_second: float = 20.0  # token-bucket rate of POST requests ...
    burst: int = 40  # ... and its bucket size
    compute_wait_s: float = 30.0  # a request waits this long for the model before a 503


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class DemoApp:
    """Answers the demo page's requests for one model.

    Args:
        actions: what the model can do (``jemlab.serve.actions``).
        reference: test-set scores for the OOD verdict, or None (the page then says why there is no verdict).
        limits: request bounds.
        ood_quantile: a drawing is called out of distribution when its −E(x) or its −‖∇ₓE(x)‖ is below the
            ood_quantile/2 quantile of the reference set, so that at most this fraction of real test images would
            be called out of distribution too (0.05 by default).
        reference_note: why there is no reference, when there is none.
        checkpoint: shown on the page (a name, never read again).
        dataset: the model's dataset name (the page scales drawings the way its images are framed).
    """

    def __init__(
        self,
        actions: ModelActions,
        reference: Reference | None,
        *,
        limits: Limits | None = None,
        ood_quantile: float = 0.05,
        reference_note: str = "",
        checkpoint: str = "",
        dataset: str = "",
    ) -> None:
        self.actions = actions
        self.reference = reference
        self.limits = limits or Limits()
        self.ood_quantile = ood_quantile
        self.reference_note = reference_note
        self.checkpoint = checkpoint
        self.dataset = dataset
        self.compute_lock = threading.Lock()  # one model call at a time: the model is not thread-safe
        self.num_values = int(np.prod(actions.image_shape))
        # Chain states of stateful samplers (EGC's noisy x_t), by a random id the page sends back; bounded.
        self.stored_chains: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None, int, str]] = OrderedDict()

    # --- requests --------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """GET /api/info: what the page needs to lay itself out."""
        ref = self.reference
        return {
            "kind": self.actions.kind,
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "image_shape": list(self.actions.image_shape),
            "class_names": self.actions.class_names,
            "sampler": self.actions.describe,
            "limits": asdict(self.limits),
            "ood_quantile": self.ood_quantile,
            "reference": None
            if ref is None
            else {"size": ref.size, "accuracy": _finite(ref.accuracy), "source": ref.source},
            "reference_note": self.reference_note,
        }

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/predict {pixels}: p(y|x), energy and the OOD verdict of one image."""
        _only(body, {"pixels"})
        x = self._image(body.get("pixels"), "pixels")
        with self._model():
            prediction = self.actions.predict(x)
        return self._describe(prediction, 0)

    def refine(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/refine {pixels, steps?, frames?, label?, seed?}: SGLD on the drawing, as animation frames."""
        _only(body, {"pixels", "steps", "frames", "label", "seed"})
        lim = self.limits
        x = self._image(body.get("pixels"), "pixels")
        steps = _int(body, "steps", 40, 1, lim.max_refine_steps)
        frames = min(_int(body, "frames", 10, 1, lim.max_frames), steps)
        label = self._label(body.get("label"))
        labels = None if label is None else torch.tensor([label])
        generator = torch.Generator().manual_seed(_int(body, "seed", 0, 0, 2**31 - 1))
        x, position, most = self.actions.refine_start(x, generator)
        if most is not None:  # a diffusion sampler has this many steps left from where the drawing enters
            steps = min(steps, most)
            frames = min(frames, steps)
        # Split the steps as evenly as possible over the frames (e.g. 40 steps in 10 frames of 4).
        chunks = [steps // frames + (1 if i < steps % frames else 0) for i in range(frames)]
        out, done = [], 0
        with self._model():
            for chunk in chunks:
                x = self.actions.advance(x, labels, chunk, generator, position + done)
                done += chunk
                shown = x.clamp(-1, 1)
                described = self._describe(self.actions.predict(shown), 0)
                out.append({"pixels": _pixels(shown[0]), **described, "step": done})
        return {"frames": out, "steps": steps, "label": label}

    def chains(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/chains {mode, label?, n?, steps?, images?, seed?}: start or continue chains for the live view.

        ``mode`` is "unconditional" (p(x)), "class" (p(x|label)) or "per_class" (one chain per class). Without
        ``images`` the chains start from the model's initialiser ("from noise"); with them, they continue. For a
        stateful sampler (EGC) the answer carries a ``chain_id`` instead, which the page sends back to continue.
        """
        _only(body, {"mode", "label", "n", "steps", "images", "seed", "chain_id"})
        lim = self.limits
        mode = body.get("mode", "unconditional")
        num_classes = len(self.actions.class_names)
        if mode == "unconditional":
            n = _int(body, "n", 8, 1, lim.max_chains)
            labels = None
        elif mode == "class":
            n = _int(body, "n", 8, 1, lim.max_chains)
            label = self._label(body.get("label"))
            if label is None:
                raise RequestError(400, "mode 'class' needs a 'label'")
            labels = torch.full((n,), label, dtype=torch.int64)
        elif mode == "per_class":
            if num_classes > lim.max_chains:
                raise RequestError(400, f"per_class needs {num_classes} chains; this server allows {lim.max_chains}")
            n = num_classes
            labels = torch.arange(num_classes)
        else:
            raise RequestError(400, "'mode' must be 'unconditional', 'class' or 'per_class'")
        steps = _int(body, "steps", 5, 0, lim.max_chain_steps)
        generator = torch.Generator().manual_seed(_int(body, "seed", 0, 0, 2**31 - 1))
        images = body.get("images")
        chain_id = body.get("chain_id")
        position = 0
        with self._model():
            if chain_id is not None:
                if not self.actions.stateful:
                    raise RequestError(400, "'chain_id' applies to diffusion models only; send 'images' instead")
                stored = self.stored_chains.get(chain_id) if isinstance(chain_id, str) else None
                if stored is None:
                    raise RequestError(404, "unknown or expired 'chain_id': restart the chains from noise")
                x, stored_labels, position, stored_mode = stored
                if stored_mode != mode or len(x) != n:
                    raise RequestError(400, "'chain_id' belongs to chains of another mode or size; restart them")
                labels = stored_labels
            elif images is None:
                x = self.actions.start(n, labels, generator)
            else:
                if self.actions.stateful:
                    raise RequestError(400, "this model's chains continue by 'chain_id', not by 'images'")
                if not isinstance(images, list) or len(images) != n:
                    raise RequestError(400, f"'images' must be a list of {n} images for this mode")
                x = torch.cat([self._image(image, f"images[{i}]") for i, image in enumerate(images)])
            x = self.actions.advance(x, labels, steps, generator, position)
            shown = x.clamp(-1, 1)
            prediction = self.actions.predict(shown)
            if self.actions.stateful:  # stored under the same lock as every other use of the store
                chain_id = chain_id if isinstance(chain_id, str) else secrets.token_hex(8)
                self.stored_chains[chain_id] = (x, labels, position + steps, mode)
                self.stored_chains.move_to_end(chain_id)
                while len(self.stored_chains) > self.limits.max_stored_chains:
                    self.stored_chains.popitem(last=False)
        answer: dict[str, Any] = {
            "images": [_pixels(image) for image in shown],
            "labels": None if labels is None else labels.tolist(),
            "energy": [round(float(e), 4) for e in prediction.energy],
            "predicted": prediction.probs.argmax(1).tolist(),
            "steps": steps,
        }
        if self.actions.stateful:
            answer["chain_id"] = chain_id
        return answer

    # --- helpers ---------------------------------------------------------------------------------------------

    def _model(self) -> _Held:
        return _Held(self.compute_lock, self.limits.compute_wait_s)

    def _image(self, pixels: Any, name: str) -> torch.Tensor:
        """A flat list of C·H·W numbers in [0, 1] → (1, C, H, W) in [−1, 1]."""
        if not isinstance(pixels, list) or len(pixels) != self.num_values:
            shape = "×".join(map(str, self.actions.image_shape))
            raise RequestError(400, f"'{name}' must be a list of {self.num_values} numbers in [0, 1] ({shape})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pixels):
            raise RequestError(400, f"'{name}' must hold only numbers")
        array = np.asarray(pixels, dtype=np.float32)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise RequestError(400, f"'{name}' values must be finite and in [0, 1]")
        return torch.from_numpy(array).view(1, *self.actions.image_shape) * 2 - 1

    def _label(self, value: Any) -> int | None:
        if value is None:
            return None
        num_classes = len(self.actions.class_names)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < num_classes:
            raise RequestError(400, f"'label' must be an integer class in [0, {num_classes - 1}] or null")
        return value

    def _describe(self, prediction: Prediction, row: int) -> dict[str, Any]:
        probs = prediction.probs[row]
        energy = float(prediction.energy[row])
        grad_norm = float(prediction.grad_norm[row])
        result: dict[str, Any] = {
            "probs": [round(float(p), 5) for p in probs],
            "predicted": int(probs.argmax()),
            "energy": _finite(energy),
            "grad_norm": _finite(grad_norm),
            "percentile": None,
            "grad_percentile": None,
            "verdict": "unknown",
        }
        ref = self.reference
        if ref is not None and math.isfinite(energy):
            # Fractions of test images no more probable than this one and with a gradient at least as steep
            # (jemlab.typicality: higher = more typical); either below ood_quantile/2 calls it out of distribution.
            percentile, grad_percentile = percentiles(ref, np.array([energy]), np.array([grad_norm]))
            result["percentile"] = float(percentile[0])
            result["grad_percentile"] = float(grad_percentile[0])
            reasons = ood_reasons(result["percentile"], result["grad_percentile"], self.ood_quantile)
            result["verdict"] = "out-of-distribution" if reasons else "in-distribution"
            result["reasons"] = reasons
        return result


class _Held:
    """Hold the compute lock for a block, or refuse with 503 after a timeout (a busy model, not a client bug)."""

    def __init__(self, lock: threading.Lock, timeout: float) -> None:
        self.lock, self.timeout = lock, timeout

    def __enter__(self) -> None:
        if not self.lock.acquire(timeout=self.timeout):
            raise RequestError(503, "the model is busy; try again in a moment")

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"'{name}' must be an integer in [{low}, {high}]")
    return value


def _pixels(image: torch.Tensor) -> list[float]:
    """(C, H, W) or (1, C, H, W) in [−1, 1] → the flat [0, 1] wire format, rounded to keep responses small."""
    unit = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).reshape(-1)
    return [round(v, 4) for v in unit.tolist()]
