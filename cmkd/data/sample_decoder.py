"""Records → samples: ``SampleDecoder`` turns a shard record into ``{key, wave, labels, target}``
under an ``on_error`` policy; ``iter_samples`` decodes many shards in order.

The layer between the shard reader (cmkd/data/shard_reader.py) and the training/eval streams
(cmkd/data/stream.py). Only FLAC/WAV/... audio and JSON labels are decoded.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from cmkd.audio.io import AudioError, load_audio
from cmkd.data.labels import LabelProblem, LabelSpec, raw_labels, resolve_labels
from cmkd.data.members import FORMAT_VERSION, find_audio_field, member_splitter
from cmkd.data.shard_reader import SampleError, SkipCounter, iter_records

ON_ERROR = ("raise", "skip")


def _audio_kind(err: AudioError) -> str:
    # AudioError carries no kind; its messages are cmkd's own (cmkd/audio/io.py).
    text = str(err)
    return "empty" if "0 frames" in text else "nan" if "NaN or Inf" in text else "audio"


class SampleDecoder:
    """Turns a record into ``{"key", "wave": Tensor[T], "labels", "target": Tensor[C]}``."""

    def __init__(
        self,
        *,
        sample_rate: int,
        class_index: dict[str, int] | None,
        multilabel: bool = True,
        length: int | None = None,
        crop: str = "start",
        on_error: str = "raise",
        skipped: SkipCounter | None = None,
        fields: dict[str, str] | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.sample_rate, self.class_index, self.multilabel = sample_rate, class_index, multilabel
        self.classes = sorted(class_index, key=class_index.__getitem__) if class_index is not None else None
        # cmkd's own shards: labels in .json; adopted ones: what `cmkd prepare webdataset` recorded.
        self.audio_field = (fields or {}).get("audio")
        self.label_spec = LabelSpec((fields or {}).get("label"), (fields or {}).get("label_key", "labels")) \
            if fields is not None else LabelSpec("json")
        self.length, self.crop, self.on_error = length, crop, on_error
        self.skipped = skipped if skipped is not None else SkipCounter()

    def labels(self, record: dict[str, Any]) -> tuple[list[str], list[int]]:
        """Parse the label member; returns label names and their class ids (raises SampleError)."""
        where = f"{record['__url__']} key {record['__key__']!r}"
        if record.get("__duplicate__"):
            raise SampleError(f"{where}: this key (or one of its fields) appears twice in the shard; keep each "
                              f"key's members together and unique, then re-write the shard", "duplicate")
        try:
            values = raw_labels(record, self.label_spec, where)
            if self.class_index is None or self.classes is None:
                return [str(v) for v in values], []
            return resolve_labels(values, self.classes, self.class_index, where, self.multilabel)
        except LabelProblem as err:
            message = f"{err}; re-write the shard" if err.kind == "incomplete" else str(err)
            raise SampleError(message, err.kind) from None

    def decode(self, record: dict[str, Any], parsed: tuple[list[str], list[int]] | None = None,
               generator: torch.Generator | None = None) -> dict[str, Any]:
        labels, ids = parsed if parsed is not None else self.labels(record)
        key, url = record["__key__"], record["__url__"]
        ext = find_audio_field(record, self.audio_field)
        if ext is None:
            wanted = f".{self.audio_field}" if self.audio_field else ".flac/.wav/.mp3/.ogg/.opus/..."
            raise SampleError(f"{url} key {key!r}: no audio member ({wanted}); re-write the shard", "incomplete")
        try:
            wave = load_audio(record[ext], sample_rate=self.sample_rate, name=f"{url} key {key!r} (.{ext})",
                              length=self.length, crop=self.crop, generator=generator)
        except AudioError as err:
            raise SampleError(str(err), _audio_kind(err)) from None
        target = torch.zeros(len(self.class_index or {}), dtype=torch.float32)
        target[ids] = 1.0
        return {"key": key, "wave": wave, "labels": labels, "target": target}

    def __call__(self, record: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any] | None:
        """Decode, applying the on_error policy (None means skipped)."""
        try:
            return self.decode(record, generator=generator)
        except SampleError as err:
            return self.handle(err)

    def try_labels(self, record: dict[str, Any]) -> tuple[list[str], list[int]] | None:
        try:
            return self.labels(record)
        except SampleError as err:
            return self.handle(err)

    def try_decode(self, record: dict[str, Any], parsed: tuple[list[str], list[int]],
                   generator: torch.Generator | None = None) -> dict[str, Any] | None:
        try:
            return self.decode(record, parsed, generator=generator)
        except SampleError as err:
            return self.handle(err)

    def handle(self, err: SampleError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped.record(err)
        return None


def iter_samples(
    urls: Iterable[str],
    *,
    sample_rate: int,
    class_index: dict[str, int] | None = None,
    multilabel: bool = True,
    length: int | None = None,
    crop: str = "start",
    on_error: str = "raise",
    skipped: SkipCounter | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    storage_options: dict[str, Any] | None = None,
    format_version: int = FORMAT_VERSION,
    fields: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of ``urls`` in shard order (``class_index=None`` skips label checks).
    ``format_version`` and ``fields`` come from the dataset's manifest."""
    decoder = SampleDecoder(sample_rate=sample_rate, class_index=class_index, multilabel=multilabel,
                            length=length, crop=crop, on_error=on_error, skipped=skipped, fields=fields)
    for record in iter_records(urls, retries=retries, backoff=backoff, storage_options=storage_options,
                               on_error=on_error, skipped=decoder.skipped, split_name=member_splitter(format_version)):
        sample = decoder(record)
        if sample is not None:
            yield sample
