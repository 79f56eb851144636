"""Builders: MMSA pickles from the real data pack's CSV files (see ../shared/data/README.md).

``build_mosi``    MOSI ``labels.csv`` (video_id, clip_id, text, label, mode) joined with
                  ``audio_opensmile.csv`` (video_id, clip_id, a0..a72) on (video_id, clip_id).
                  text  = frozen pretrained encoder token states (N, max_len, d) + ``text_bert``
                  audio = one openSMILE vector per segment (N, 1, 73); no vision.
                  Splits follow the ``mode`` column (train / valid / test).
``build_mosei``   MOSEI ``labels.csv`` (video_id, clip_id, text, label, mode): text only
                  (frozen encoder token states + ``text_bert``); splits follow ``mode``.
``build_bclstm``  bc-LSTM's utterance-level features (video_id, clip_id, label, t*, a*, v*):
                  text/audio/vision (N, 1, d); validation carved from train by video id.

Each returns ``(MMSAData, report)``; ``report`` is a JSON-ready dict (sizes, dims, join
counts and the first unjoined ids, non-finite values replaced by 0, ...). Rows are kept in
file order, so the same inputs give byte-identical arrays. Bad input raises ``CPSLError``
with one line.

Layout: :mod:`.table` (the CSV table layer: reading, keys, labels, the ``mode`` column, feature
columns, kept rows as MMSA splits), :mod:`.text` (transcripts through the frozen encoder), and one
module per data set (:mod:`.mosi`, :mod:`.mosei`, :mod:`.bclstm`). A new data set is a module here
returning ``(MMSAData, report)``, named in ``__all__`` below and given a ``cpsl data build-*`` command.
"""
from __future__ import annotations

from .bclstm import build_bclstm, valid_videos
from .mosei import build_mosei
from .mosi import build_mosi, join_mosi
from .text import encode_texts

__all__ = ["build_mosi", "join_mosi", "build_mosei", "build_bclstm", "valid_videos", "encode_texts"]
