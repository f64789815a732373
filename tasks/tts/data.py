"""LJSpeech data for the TTS task: loading, CAB's split, characters, and acoustic features.

Features are CAB's: 80-band log-mel spectrograms of 22,050 Hz audio with a 1024-sample window,
a 256-sample hop and an 8 kHz upper band edge. Each mel frame ``t`` covers samples
``[t * 256 - 512, t * 256 + 512)`` (centred STFT), so a clip of ``n`` samples has
``1 + n // 256`` frames; durations, pitch and energy all live on this frame grid.
"""

from __future__ import annotations

import csv
import re
import tarfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import soundfile as sf
import torch
from torch import Tensor

SAMPLE_ROOT = Path(__file__).parent / "samples" / "ljspeech_mini"
LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class FeatureSettings:
    """The analysis every spectrogram in the task uses (CAB's LJSpeech settings)."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5

    def frames(self, samples: int) -> int:
        """Number of (centred) frames of a clip of ``samples`` samples."""
        return 1 + samples // self.hop_length


FEATURES = FeatureSettings()


class CharacterVocabulary:
    """Characters of LJSpeech's normalised transcripts, ESPnet's token conventions.

    Id 0 is padding (``<blank>``), 1 is ``<unk>`` and the last id is ``<sos/eos>``, which ESPnet's
    TTS models append to every input (``eos = idim - 1``).
    """

    characters = " !\"'(),-.:;?abcdefghijklmnopqrstuvwxyz"

    def __init__(self) -> None:
        self.tokens = ["<blank>", "<unk>", *self.characters, "<sos/eos>"]
        self._ids = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def normalise(text: str) -> str:
        """Lower case, typographic quotes and dashes folded, whitespace collapsed."""
        text = text.lower().translate(str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"',
                                                     "\u2014": "-", "\u2013": "-"}))
        return re.sub(r"\s+", " ", text).strip()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (normalised first; characters outside the set become <unk>)."""
        return [self._ids.get(c, 1) for c in self.normalise(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] if 1 < i < len(self.tokens) - 1 else "?" for i in ids)


@dataclass(frozen=True)
class Clip:
    """One LJSpeech clip: id, normalised transcript and audio file."""

    clip_id: str
    text: str
    audio: Path


def read_ljspeech(root: Path) -> list[Clip]:
    """Clips of an LJSpeech-1.1 folder (``metadata.csv`` + ``wavs/``), in metadata order.

    Audio may be ``wavs/ID.wav`` (the original release) or ``wavs/ID.flac`` (the shipped sample,
    losslessly compressed). Raises naming the folder when a file is missing.
    """
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"{root} is not an LJSpeech folder: no metadata.csv")
    clips = []
    with metadata.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE):
            clip_id, normalised = row[0], row[-1]
            for suffix in (".wav", ".flac"):
                audio = root / "wavs" / f"{clip_id}{suffix}"
                if audio.is_file():
                    break
            else:
                raise FileNotFoundError(f"{root}: no wavs/{clip_id}.wav or .flac")
            clips.append(Clip(clip_id, normalised, audio))
    return clips


def split_clips(clips: Sequence[Clip]) -> dict[str, list[Clip]]:
    """CAB's split of the full LJSpeech (chapters LJ001-LJ002 test, LJ003 dev, the rest train).

    A folder without LJ003 is a sample of the first chapter (the shipped 32 clips are all in
    CAB's test chapter LJ001), which is re-split by clip number: numbers divisible by 8 test,
    4 mod 8 dev, the rest train (24 / 4 / 4 clips for LJ001-0001..0032).
    """
    chapters = {c.clip_id.split("-")[0] for c in clips}
    splits: dict[str, list[Clip]] = {name: [] for name in SPLITS}
    if "LJ003" in chapters:
        for clip in clips:
            chapter = clip.clip_id.split("-")[0]
            name = "test" if chapter in ("LJ001", "LJ002") else "dev" if chapter == "LJ003" else "train"
            splits[name].append(clip)
    else:
        for clip in clips:
            number = int(clip.clip_id.split("-")[1])
            name = "test" if number % 8 == 0 else "dev" if number % 8 == 4 else "train"
            splits[name].append(clip)
    return splits


def load_audio(path: Path, settings: FeatureSettings = FEATURES) -> np.ndarray:
    """Mono float32 waveform at the task's sample rate; other rates are an error."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != settings.sample_rate:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {settings.sample_rate} Hz")
    return audio.mean(axis=1)


def mel_basis(settings: FeatureSettings = FEATURES) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] Slaney mel filterbank."""
    return librosa.filters.mel(sr=settings.sample_rate, n_fft=settings.n_fft, n_mels=settings.n_mels,
                               fmin=settings.fmin, fmax=settings.fmax)


def magnitude_spectrogram(audio: np.ndarray, settings: FeatureSettings = FEATURES) -> np.ndarray:
    """[n_fft // 2 + 1, T] STFT magnitude (Hann window, centred frames)."""
    return np.abs(librosa.stft(audio, n_fft=settings.n_fft, hop_length=settings.hop_length,
                               win_length=settings.n_fft))


def log_mel(audio: np.ndarray, settings: FeatureSettings = FEATURES,
            magnitude: np.ndarray | None = None) -> np.ndarray:
    """[T, n_mels] natural-log mel magnitude spectrogram, floored at ``log_floor``.

    ``magnitude`` ([n_fft // 2 + 1, T]) skips the STFT when the caller already has it.
    """
    if magnitude is None:
        magnitude = magnitude_spectrogram(audio, settings)
    mel = mel_basis(settings) @ magnitude
    return np.log(np.maximum(mel, settings.log_floor)).T.astype(np.float32)


def frame_energy(magnitude: np.ndarray) -> np.ndarray:
    """[T] L2 norm of each frame's STFT magnitude (ESPnet's ``Energy`` feature)."""
    return np.linalg.norm(magnitude, axis=0).astype(np.float32)


def frame_pitch(audio: np.ndarray, settings: FeatureSettings = FEATURES) -> np.ndarray:
    """[T] fundamental frequency in Hz, 0 on unvoiced frames.

    F0 by YIN (``librosa.yin``, 60-500 Hz). YIN reports a value on every frame, so a frame counts
    as voiced when its energy is within 30 dB of the clip's loudest frame and its zero-crossing
    rate is below 0.15 (fricatives and silence cross zero far more often than voiced speech).
    ``librosa.pyin`` decides voicing itself but takes about 6 s per second of audio here.
    """
    kwargs = {"frame_length": settings.n_fft, "hop_length": settings.hop_length}
    f0 = librosa.yin(audio, fmin=60.0, fmax=500.0, sr=settings.sample_rate, **kwargs)
    rms_db = librosa.amplitude_to_db(librosa.feature.rms(y=audio, **kwargs)[0], ref=np.max)
    zcr = librosa.feature.zero_crossing_rate(audio, **kwargs)[0]
    voiced = (rms_db > -30.0) & (zcr < 0.15)
    return np.where(voiced, f0, 0.0).astype(np.float32)


@dataclass
class Utterance:
    """A clip's model inputs and targets.

    Attributes:
        clip_id: LJSpeech id.
        tokens: [N] character ids (without the end-of-sequence token ESPnet appends).
        mel: [T, n_mels] log-mel spectrogram (not normalised).
        pitch: [T] F0 in Hz, 0 where unvoiced.
        energy: [T] frame energy.
        durations: [N + 1] frames per token, the last for <sos/eos> (always 0); set by the aligner.
        token_pitch: [N + 1] mean log F0 of each token's voiced frames (0: none voiced).
        token_energy: [N + 1] mean energy of each token's frames.
    """

    clip_id: str
    tokens: Tensor
    mel: Tensor
    pitch: Tensor
    energy: Tensor
    durations: Tensor | None = field(default=None)
    token_pitch: Tensor | None = field(default=None)
    token_energy: Tensor | None = field(default=None)

    @property
    def frames(self) -> int:
        return self.mel.shape[0]


def extract(clip: Clip, vocabulary: CharacterVocabulary,
            settings: FeatureSettings = FEATURES) -> Utterance:
    """Tokens and frame-level features of one clip."""
    audio = load_audio(clip.audio, settings)
    magnitude = magnitude_spectrogram(audio, settings)
    tokens = vocabulary.encode(clip.text)
    if not tokens:
        raise ValueError(f"{clip.clip_id}: empty transcript")
    return Utterance(
        clip_id=clip.clip_id,
        tokens=torch.tensor(tokens, dtype=torch.long),
        mel=torch.from_numpy(log_mel(audio, settings, magnitude)),
        pitch=torch.from_numpy(frame_pitch(audio, settings)),
        energy=torch.from_numpy(frame_energy(magnitude)),
    )


def token_average(values: Tensor, durations: Tensor, *, skip_zeros: bool) -> Tensor:
    """Average a frame-level feature over each token's frames (FastPitch / ESPnet style).

    Args:
        values: [T] frame values.
        durations: [N] frames per token, summing to T.
        skip_zeros: average only non-zero frames (unvoiced frames carry F0 = 0); a token without
            any counts as 0.

    Returns:
        [N] token averages.
    """
    if int(durations.sum()) != values.shape[0]:
        raise ValueError(f"durations sum to {int(durations.sum())}, features have {values.shape[0]} frames")
    token_of_frame = torch.repeat_interleave(torch.arange(durations.shape[0]), durations)  # [T]
    weights = (values != 0).float() if skip_zeros else torch.ones_like(values)
    totals = torch.zeros(durations.shape[0]).index_add_(0, token_of_frame, values * weights)
    counts = torch.zeros(durations.shape[0]).index_add_(0, token_of_frame, weights)
    return torch.where(counts > 0, totals / counts.clamp(min=1), torch.zeros_like(totals))


@dataclass(frozen=True)
class Normaliser:
    """Global mean and standard deviation of a feature (from the training split)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, values: Sequence[Tensor]) -> Normaliser:
        stacked = torch.cat([v.reshape(-1, *v.shape[1:]) for v in values])
        return cls(stacked.mean(0), stacked.std(0).clamp(min=1e-5))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


def pad(sequences: Sequence[Tensor], value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Right-pad to a batch: ([B, L_max, ...], lengths [B])."""
    lengths = torch.tensor([s.shape[0] for s in sequences], dtype=torch.long)
    batch = torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True, padding_value=value)
    return batch, lengths


@dataclass
class Corpus:
    """Features of the clips one run uses, and the training-set normalisers."""

    train: list[Utterance]
    test: list[Utterance]
    mel: Normaliser
    data: Path
    pitch: Normaliser | None = None
    energy: Normaliser | None = None


def checked_splits(data: Path, config: Any) -> dict[str, list[Clip]]:
    """CAB's split of the LJSpeech folder ``data``; a ``ValueError`` naming the folder if it has
    no training clip or fewer test clips than ``eval_clips``."""
    splits = split_clips(read_ljspeech(data))
    if not splits["train"] or len(splits["test"]) < config.eval_clips:
        raise ValueError(f"{data}: {len(splits['train'])} training and {len(splits['test'])} test clips; "
                         f"eval_clips={config.eval_clips} asks for more")
    return splits


def load_corpus(config: Any) -> Corpus:
    """Read the dataset, split it, extract features of the training and evaluated test clips."""
    data = Path(config.data).expanduser() if config.data else SAMPLE_ROOT
    splits = checked_splits(data, config)
    train_clips = splits["train"]
    if config.train_clips:
        train_clips = sorted(train_clips, key=lambda c: sf.info(c.audio).frames)[: config.train_clips]
    vocabulary = CharacterVocabulary()
    train = [extract(c, vocabulary) for c in train_clips]
    test = [extract(c, vocabulary) for c in splits["test"][: config.eval_clips or None]]
    return Corpus(train, test, Normaliser.fit([u.mel for u in train]), data)


def fetch_ljspeech(destination: Path) -> Path:
    """Download and unpack LJSpeech-1.1 (2.6 GB) into ``destination``; returns its folder.

    Use it with ``attnbench data fetch ljspeech`` and then ``data=<folder>`` (CAB's split:
    LJ001-LJ002 test, LJ003 dev, the rest train). Durations for FastSpeech 2 are computed on the
    first run (or beforehand with ``attnbench data prepare ljspeech_durations --data <folder>``).
    """
    folder = destination / "LJSpeech-1.1"
    if (folder / "metadata.csv").is_file():
        return folder
    destination.mkdir(parents=True, exist_ok=True)
    archive = destination / "LJSpeech-1.1.tar.bz2"
    if not archive.is_file():
        partial = archive.with_suffix(".part")
        urllib.request.urlretrieve(LJSPEECH_URL, partial)
        partial.rename(archive)
    with tarfile.open(archive, "r:bz2") as tar:
        tar.extractall(destination, filter="data")
    archive.unlink()
    if not (folder / "metadata.csv").is_file():
        raise FileNotFoundError(f"{archive} did not contain LJSpeech-1.1/metadata.csv")
    return folder

