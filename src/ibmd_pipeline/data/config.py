"""Where the images come from, their size, and how they are split (``params:data``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ibmd_pipeline.engine.config import require
from ibmd_pipeline.engine.storage import is_local

DataSource = Literal["embedded", "folder", "tar", "paired_ab", "paired_folders", "paired_suffix"]
PAIRED_SOURCES: tuple[str, ...] = ("paired_ab", "paired_folders", "paired_suffix")
#: Filesystem arguments that are secrets: ``data.storage_options`` is written into the manifests.
SECRET_OPTIONS = frozenset(
    {"key", "secret", "token", "password", "session_token", "client_secret", "account_key", "sas_token"}
)
#: Sources ``data.stream`` can read file by file (``tar`` is always streamed).
STREAMED_SOURCES: tuple[str, ...] = ("folder", "tar", "paired_ab")


@dataclass(frozen=True)
class DataConfig:
    """The image source and its preprocessing.

    source:
        ``embedded``: the 10,000 animal silhouettes of the ``animal-mnist`` package (28x28 gray,
        10 classes), centred on a black canvas of ``image_size`` (or shrunk, if smaller than 28).
        ``folder``: every readable image under ``path`` (recursively); when all images sit in
        sub-folders, the first sub-folder name is the class label.
        ``tar``: the images inside the ``.tar`` shards under ``path`` (or the one shard ``path``),
        webdataset-style; the first folder of a member's name is its class label, as for ``folder``.
        Always streamed.
        ``paired_ab``: pix2pix-style images under ``path``, two halves side by side (A left,
        B right); ``direction`` says which half is the corrupted source.
        ``paired_folders``: clean images under ``path``, corrupted ones under
        ``corrupted_path``, matched by relative path without the file extension.
        ``paired_suffix``: both in one folder, the corrupted partner of ``name.png`` being
        ``name<corrupted_suffix>.png`` (DDBM's preprocessed DIODE: ``x.png`` and ``x_normal.png``);
        files that are neither are ignored with a warning.
    path: the image folder (``folder``, ``paired_ab``, ``paired_suffix``) or the clean-image folder
        (``paired_folders``). For streamed ``folder`` and ``tar`` sources it may be an fsspec URL
        (``s3://bucket/prefix``, ``gs://...``, ``memory://...``; ``data.remote``): such a source is
        always streamed.
    storage_options: fsspec filesystem arguments for a URL ``path`` (e.g.
        ``{client_kwargs: {endpoint_url: ...}}``, ``anon: true``), or null. They are saved in the
        manifests, so no secret (``key``, ``secret``, ``token``, ...) is allowed: credentials come
        from the store's usual environment variables or files.
    corrupted_path: the corrupted-image folder (``paired_folders`` only).
    direction: ``a_to_b`` = A (left half) is corrupted, B (right half) is clean; ``b_to_a`` swaps them.
    corrupted_suffix: ``paired_suffix`` only: what the corrupted partner's name adds to the stem.
    image_size: side of the square images, in pixels. Folder images are brought to it as ``resize`` says.
    resize: ``fit_bicubic`` (shorter side to ``image_size`` and centre crop, bicubic), ``i2sb``
        (I2SB's ImageNet transform: torchvision ``Resize(image_size)``, bilinear with antialias,
        then ``CenterCrop``), ``ddbm`` (DDBM's: each image squeezed to ``image_size`` square,
        bicubic, aspect not kept).
    corrupted_resample: how the corrupted side of a pair is resampled: ``same`` as the clean side,
        or ``nearest`` (DDBM's DIODE normal maps).
    channels: 1 (grayscale) or 3 (RGB); images are converted on load.
    val_fraction, test_fraction: shares of the images held out for validation and test (each
        split gets at least one image); the rest is the training split.
    max_images: use at most this many images (a seeded random subset), or all when null.
    stream: read the images from their files batch by batch, degrading each on the fly
        (``data.stream``; docs/scaling.md), instead of decoding the whole set into memory:
        ``true``, ``false``, or ``auto``: stream ``tar`` sources, and ``folder`` and ``paired_ab``
        sources of at least ``stream_min_images`` images (after ``max_images``). A streamed
        ``paired_ab`` file is split into its halves on the fly and not degraded. Other sources
        are never streamed.
    stream_min_images: the size from which ``auto`` streams a folder (``folder``, ``paired_ab``).
    workers: reader processes of the streamed loader (0: read in the training process).
    prefetch: batches each reader process keeps ready ahead of the step.
    small_images: what to do with folder images whose shorter side is below ``image_size``:
        ``upscale`` them (one warning lists them) or raise an ``error`` naming the first.
    """

    source: DataSource = "embedded"
    path: str | None = None
    corrupted_path: str | None = None
    direction: Literal["a_to_b", "b_to_a"] = "a_to_b"
    corrupted_suffix: str = "_normal"
    image_size: int = 32
    channels: Literal[1, 3] = 1
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    max_images: int | None = None
    small_images: Literal["upscale", "error"] = "upscale"
    resize: Literal["fit_bicubic", "i2sb", "ddbm"] = "fit_bicubic"
    corrupted_resample: Literal["same", "nearest"] = "same"
    stream: bool | Literal["auto"] = "auto"
    stream_min_images: int = 20000
    workers: int = 4
    prefetch: int = 2
    storage_options: dict[str, Any] | None = None

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            8 <= self.image_size <= 1024,
            f"{prefix}image_size",
            f"must be in [8, 1024], got {self.image_size}",
        )
        # Literal[1, 3] also admits True and 3.0 (they compare equal); only an int is meant.
        require(
            type(self.channels) is int, f"{prefix}channels", f"got {self.channels!r}; allowed values: 1, 3"
        )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, f"{prefix}{name}", f"must be in (0, 1), got {value}")
        require(
            self.val_fraction + self.test_fraction < 1.0,
            f"{prefix}test_fraction",
            f"val_fraction + test_fraction must be below 1 to leave training images, got "
            f"{self.val_fraction} + {self.test_fraction}",
        )
        require(
            self.max_images is None or self.max_images >= 3,
            f"{prefix}max_images",
            f"must be null or at least 3 (one image per split), got {self.max_images}",
        )
        require(
            self.stream_min_images >= 1,
            f"{prefix}stream_min_images",
            f"must be >= 1, got {self.stream_min_images}",
        )
        require(self.workers >= 0, f"{prefix}workers", f"must be >= 0, got {self.workers}")
        require(self.prefetch >= 1, f"{prefix}prefetch", f"must be >= 1, got {self.prefetch}")
        if self.stream is True:
            require(
                self.source in STREAMED_SOURCES,
                f"{prefix}stream",
                f"streams sources 'folder', 'tar' and 'paired_ab' only, got source '{self.source}'; "
                "allowed values here: false, auto",
            )
        if self.source == "tar":
            require(
                self.stream is not False,
                f"{prefix}stream",
                "source 'tar' is always streamed; allowed values: true, auto",
            )
        if self.source == "embedded":
            require(self.path is None, f"{prefix}path", "must be null for source 'embedded'")
        else:
            require(bool(self.path), f"{prefix}path", f"is required for source '{self.source}'")
        if self.source == "paired_folders":
            require(
                bool(self.corrupted_path),
                f"{prefix}corrupted_path",
                "is required for source 'paired_folders' (the folder of corrupted images)",
            )
        else:
            require(
                self.corrupted_path is None,
                f"{prefix}corrupted_path",
                f"is only used by source 'paired_folders', got it with source '{self.source}'",
            )

        self._validate_urls(prefix)

        if self.source == "paired_suffix":
            require(
                bool(self.corrupted_suffix) and "/" not in self.corrupted_suffix,
                f"{prefix}corrupted_suffix",
                f"must be a non-empty name ending such as '_normal', got {self.corrupted_suffix!r}",
            )

    def _validate_urls(self, prefix: str) -> None:
        """A URL ``path`` only for streamed sources; ``storage_options`` only with one, and no secrets."""
        url = bool(self.path) and not is_local(str(self.path))
        if url:
            require(
                self.source in ("folder", "tar"),
                f"{prefix}path",
                f"an object-store URL ('{self.path}') is read by the streamed sources 'folder' and 'tar' "
                f"only, got source '{self.source}'; copy the images to a local folder",
            )
            require(
                self.stream is not False,
                f"{prefix}stream",
                f"a source at an object-store URL ('{self.path}') is always streamed; "
                "set data.stream: true (or auto)",
            )
        if self.corrupted_path is not None:
            require(
                is_local(str(self.corrupted_path)),
                f"{prefix}corrupted_path",
                f"must be a local folder (paired sources are read into memory), got '{self.corrupted_path}'",
            )
        if self.storage_options is not None:
            require(
                url,
                f"{prefix}storage_options",
                "is only used with an object-store URL as data.path (s3://, gs://, memory://, ...)",
            )
            require(
                all(isinstance(name, str) for name in self.storage_options),
                f"{prefix}storage_options",
                f"must map option names to values, got keys {list(self.storage_options)!r}",
            )
            secrets = sorted(SECRET_OPTIONS & set(self.storage_options))
            require(
                not secrets,
                f"{prefix}storage_options",
                f"must not hold credentials ({', '.join(secrets)}): they would be saved in the manifests; "
                "set them in the store's environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "~/.aws, GOOGLE_APPLICATION_CREDENTIALS)",
            )

    @property
    def paired(self) -> bool:
        """Whether the source provides the corrupted images itself."""
        return self.source in PAIRED_SOURCES
