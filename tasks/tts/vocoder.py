"""Griffin-Lim vocoder, WAV output and the mel-spectrogram figure."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from tasks.tts.data import FEATURES, FeatureSettings, mel_basis


@functools.cache
def _inverse_mel_basis(settings: FeatureSettings) -> np.ndarray:
    return np.linalg.pinv(mel_basis(settings))  # [n_fft // 2 + 1, n_mels]


def griffin_lim(log_mel: np.ndarray, *, iterations: int = 32,
                settings: FeatureSettings = FEATURES) -> np.ndarray:
    """Waveform from a natural-log mel magnitude spectrogram.

    The linear magnitude is the pseudo-inverse of the mel filterbank applied to the mel
    magnitude (as ESPnet's Griffin-Lim does), floored at 1e-10; the phase is Griffin-Lim's
    (librosa, momentum 0.99, fixed random initial phase so that resynthesis is reproducible).

    Args:
        log_mel: [T, n_mels].
        iterations: Griffin-Lim iterations.

    Returns:
        [(T - 1) * hop_length] float32 samples.
    """
    magnitude = np.maximum(_inverse_mel_basis(settings) @ np.exp(log_mel.T), 1e-10)  # [F, T]
    audio = librosa.griffinlim(magnitude, n_iter=iterations, hop_length=settings.hop_length,
                               win_length=settings.n_fft, n_fft=settings.n_fft, random_state=0)
    return audio.astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, settings: FeatureSettings = FEATURES) -> None:
    """16-bit PCM WAV at the task's sample rate (samples clipped to [-1, 1])."""
    sf.write(path, np.clip(audio, -1.0, 1.0), settings.sample_rate, subtype="PCM_16")


def plot_mels(path: Path, panels: Sequence[tuple[str, np.ndarray]], title: str) -> None:
    """A PNG of log-mel spectrograms ([T, n_mels] each) stacked vertically, one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = min(float(m.min()) for _, m in panels)
    high = max(float(m.max()) for _, m in panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False,
                                layout="constrained")
    for axis, (label, mel) in zip(axes[:, 0], panels):
        image = axis.imshow(mel.T, origin="lower", aspect="auto", vmin=low, vmax=high, cmap="magma")
        axis.set_title(label, fontsize=10)
        axis.set_ylabel("mel band")
    axes[-1, 0].set_xlabel("frame (256 samples at 22,050 Hz)")
    figure.colorbar(image, ax=axes[:, 0].tolist(), label="log mel magnitude")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
