"""What identifies the features an index holds: the weights' fingerprint, the architecture's name, the
preprocessing and the precision; an index refuses queries and updates from a model whose identity differs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from clipforge.features import ImageTransform, feature_identity, model_fingerprint
from clipforge.index.errors import IndexFormatError, ModelMismatchError


@dataclass(frozen=True)
class ModelIdentity:
    """The model an index was built with. ``fingerprint`` is :func:`clipforge.features.model_fingerprint` of its
    weights, ``preprocessing`` the transform's repr, ``embed_dim`` the vectors' dimension D."""

    fingerprint: str
    architecture: str
    preprocessing: str
    precision: str
    embed_dim: int

    @classmethod
    def of(cls, model: nn.Module, transform: ImageTransform | None, precision: str = "fp32") -> ModelIdentity:
        config = getattr(model, "config", None)
        return cls(
            fingerprint=model_fingerprint(model),
            architecture=str(getattr(config, "name", None) or type(model).__name__),
            preprocessing=repr(transform),
            precision=precision,
            embed_dim=int(config.embed_dim),
        )

    @property
    def key(self) -> str:
        """One hash of what the stored vectors depend on (:func:`~clipforge.features.feature_identity`)."""
        return feature_identity(
            kind="index_rows", model=self.fingerprint, transform=self.preprocessing, precision=self.precision
        )

    def describe(self) -> str:
        return f"'{self.architecture}' (weights {self.fingerprint[:12]}, {self.precision})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> ModelIdentity:
        if not isinstance(data, dict):
            raise IndexFormatError(f"{where}: 'model' must be an object with the model's identity")
        try:
            return cls(
                fingerprint=str(data["fingerprint"]),
                architecture=str(data["architecture"]),
                preprocessing=str(data["preprocessing"]),
                precision=str(data["precision"]),
                embed_dim=int(data["embed_dim"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(
                f"{where}: 'model' lacks a valid field ({exc}); rebuild the index"
            ) from exc

    def check_query_model(self, other: ModelIdentity, index: str, *, images: bool) -> None:
        """Raise :class:`ModelMismatchError` naming both models unless ``other`` has the same weights (and, for
        image queries or updates, the same preprocessing)."""
        same = other.fingerprint == self.fingerprint and (
            not images or other.preprocessing == self.preprocessing
        )
        if not same:
            what = "weights" if other.fingerprint != self.fingerprint else "preprocessing"
            raise ModelMismatchError(
                f"{index} was built with model {self.describe()}, but the model given is {other.describe()} "
                f"(different {what}): its vectors are not comparable; use the model that built the index, "
                "or build a new index with this one (clipforge index build IMAGES... --model M --out NEW)"
            )


__all__ = ["ModelIdentity"]
