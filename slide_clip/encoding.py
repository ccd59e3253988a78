"""Stage 3: a tiled store's tiles through the encoder into its embeddings, in row order.

Split in two so a run over many slides can queue the next slide's tiles while this one
encodes (:class:`slide_clip.executor.SlideRun`): :func:`begin_encoding` opens the embeddings group
(resuming at the first row not on disk) and queues the tile batches; :func:`run_encoding`
encodes them as they arrive. :func:`encode_store` does both.

Tiles travel as uint8 and are normalised on the device when the tile is the model's input
size and its preprocess is the standard one (:mod:`slide_clip.encoders.pixels`); otherwise
each tile goes through the encoder's own PIL preprocess in the reader.
"""

from __future__ import annotations

from dataclasses import dataclass

from slide_clip.config import PipelineConfig
from slide_clip.errors import SlideClipError, SlideError
from slide_clip.stages import grid_from_store
from slide_clip.store import SlideStore, model_key


@dataclass
class Encoding:
    """An embeddings group opened for writing and the tile batches queued for it."""

    store: SlideStore
    slide_file: str
    writer: object
    stream: object  # slide_clip.loader.TileStream
    norm: object  # PixelNorm, or None when the reader applies the encoder's preprocess
    n_tiles: int
    start: int

    def cancel(self) -> None:
        """Drop the queued batches and write what was encoded (nothing is lost on resume)."""
        self.stream.close()
        self.writer.flush()


def begin_encoding(store: SlideStore, slide_file: str, encoder, cfg: PipelineConfig, *,
                   pool=None, replace: bool = False) -> Encoding | None:
    """Open ``encoder``'s embeddings group in ``store`` and queue its missing tiles.

    Returns None when the group is already complete. ``pool`` (a
    :class:`slide_clip.loader.ReaderPool`) reads the batches; None reads them in this
    process when they are asked for. ``replace`` re-encodes a complete group of the same
    weights (written beside it, see :meth:`SlideStore.begin_embeddings`).
    """
    from slide_clip.encoders.spec import same_build
    from slide_clip.encoders.tile_view import encoder_view
    from slide_clip.loader import tile_batches

    e = cfg.encode
    tiling = store.tiling
    size = int(tiling["tile_size"])
    provenance = {**encoder.provenance(), **encoder_view(encoder, size, tiling["target_mpp"]).attrs()}
    made = model_key(encoder.name) in store.models()
    # a group made another way (architecture, output, activation) is never kept: it is made again beside
    # the old one and swapped in when complete, like a forced re-encode
    replace = replace or (made and not same_build(store.embedding_attrs(encoder.name), encoder))
    writer = store.begin_embeddings(provenance, chunk_rows=e.chunk_rows, replace=replace)
    writer.flush_seconds = e.flush_seconds
    if writer.complete:
        return None
    start = writer.next_row
    grid = grid_from_store(store)
    norm = encoder.pixel_norm(size)
    stream = tile_batches(slide_file, grid, start=start, batch_size=e.batch_size,
                          preprocess=None if norm is not None else encoder.preprocess, pool=pool)
    return Encoding(store, slide_file, writer, stream, norm, len(grid), start)


def run_encoding(enc: Encoding, encoder, *, progress: bool = True) -> int:
    """Encode the queued batches of ``enc`` in row order; returns how many tiles were encoded."""
    from tqdm.auto import tqdm

    writer = enc.writer
    done = 0
    bar = tqdm(total=enc.n_tiles, initial=enc.start, unit="tile", desc=enc.store.path.stem,
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for idx, pixels in enc.stream:
            if int(idx[0]) != writer.next_row:  # tile order is the row order; never skip or repeat
                raise RuntimeError(f"loader returned tile {int(idx[0])}, expected {writer.next_row}")
            if enc.norm is not None:
                writer.append(encoder.encode_uint8(pixels, enc.norm))
            else:
                writer.append(encoder.encode_images(pixels))
            done += len(idx)
            bar.update(len(idx))
    except SlideClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reader's error arrives here
        text = str(exc).strip().splitlines()
        reason = next((ln for ln in reversed(text) if ln.strip()), type(exc).__name__)
        if ("OpenSlide" in reason or "openslide" in "".join(text) or "TIFF" in reason
                or "tile-reading process died" in reason):
            raise SlideError(f"failed while reading tiles ({reason.strip()[:200]})", path=enc.slide_file,
                             hint="The file may be truncated or corrupt; copy it again.") from None
        raise
    finally:
        bar.close()
        enc.stream.close()
        writer.flush()
    return done


def encode_store(store: SlideStore, slide_file: str, encoder, cfg: PipelineConfig, *, progress: bool = True,
                 pool=None) -> int:
    """Encode the store's tiles not yet written with ``encoder``; returns how many were encoded.

    Resumes at the first row not on disk; a complete group is left alone. ``pool`` (a
    :class:`slide_clip.loader.ReaderPool`) is used if given; else one is started for this
    store when ``cfg.encode.num_workers`` resolves to workers, and closed after.
    """
    from slide_clip.loader import ReaderPool, resolve_workers

    own = None
    if pool is None:
        n = resolve_workers(cfg.encode.num_workers, encoder.device)
        own = pool = ReaderPool(n) if n > 0 else None
    try:
        enc = begin_encoding(store, slide_file, encoder, cfg, pool=pool)
        return 0 if enc is None else run_encoding(enc, encoder, progress=progress)
    finally:
        if own is not None:
            own.close()
