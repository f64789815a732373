"""Spectral distortion between synthesized and reference speech.

The reference is the Griffin-Lim resynthesis of the ground-truth spectrogram, so that the
vocoder's own artefacts cancel. Both waveforms are analysed again and aligned by dynamic time
warping (DTW) with a Euclidean frame distance.

- ``mcd``: mel cepstral distortion in dB as ESPnet's TTS evaluation computes it
  (``egs2/TEMPLATE/*/pyscripts/utils/evaluate_mcd.py``): mel-cepstra of order 34 with all-pass
  constant 0.45 (ESPnet's choice at 22,050 Hz) from Hamming-windowed frames of 1024 samples every
  256, DTW between the two sequences, and ``(10 / ln 10) * sqrt(2 * sum_d (c_d - c'_d)^2)``
  averaged over the frame pairs of the DTW path (c_0 included, as ESPnet does). ESPnet estimates
  the mel-cepstrum with SPTK's ``mcep`` (an iterative fit) and aligns with ``fastdtw`` (an
  approximation); here the mel-cepstrum is the cosine expansion of the log amplitude spectrum on
  the warped frequency axis, and DTW is exact (librosa).
- ``msd``: mean Euclidean distance of the 80-band natural-log mel frames along their DTW path.
- ``length_ratio``: synthesized over reference frames. An autoregressive model that stops early
  (or never) shows here rather than inside the distortions; averaging over the DTW path keeps a
  4-frame output from dividing a whole utterance's distance by 4.
- ``cab_mcd``, ``cab_msd``: CAB's normalisation (the DTW distance of 13 MFCCs, or of the log-mel
  frames, divided by the number of synthesized frames), kept for comparison with CAB's tables;
  an early stop inflates them without bound.
"""

from __future__ import annotations

import math

import librosa
import numpy as np
from scipy.spatial.distance import cdist

from tasks.tts.data import FEATURES, FeatureSettings, mel_basis

MFCC_COEFFICIENTS = 13
MCEP_ORDER = 34
MCEP_ALPHA = 0.45
"""ESPnet's mel-cepstral order and all-pass constant for 22,050 Hz audio."""
_DB = 10.0 / math.log(10.0)


def dtw(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Minimum accumulated Euclidean distance over monotonic alignments of two sequences.

    Steps (1, 0), (0, 1) and (1, 1), each adding the distance of the pair it lands on; the path
    starts at the first pair and ends at the last.

    Args:
        x: [T1, D].
        y: [T2, D].

    Returns:
        (accumulated distance, path [P, 2] of index pairs from the first to the last).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"dtw needs [T1, D] and [T2, D] arrays, got {x.shape} and {y.shape}")
    accumulated, path = librosa.sequence.dtw(C=cdist(x, y), backtrack=True)
    return float(accumulated[-1, -1]), path[::-1]


def _mel_power(audio: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """[n_mels, T] mel power spectrogram."""
    power = np.abs(librosa.stft(audio, n_fft=settings.n_fft, hop_length=settings.hop_length)) ** 2
    return mel_basis(settings) @ power


def mfcc(audio: np.ndarray, settings: FeatureSettings = FEATURES) -> np.ndarray:
    """[T, 13] MFCCs as librosa computes them (dB mel power, orthonormal DCT-II)."""
    mel_db = librosa.power_to_db(_mel_power(audio, settings))
    return librosa.feature.mfcc(S=mel_db, n_mfcc=MFCC_COEFFICIENTS).T


def log_mel_spectrum(audio: np.ndarray, settings: FeatureSettings = FEATURES) -> np.ndarray:
    """[T, n_mels] natural-log mel magnitude (the features the models predict)."""
    magnitude = np.sqrt(_mel_power(audio, settings))
    return np.log(np.maximum(magnitude, settings.log_floor)).T


def frames(audio: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """[T, frame_length] Hamming-windowed frames, without padding as ESPnet's MCD analysis, except
    that audio shorter than one frame (an output that stopped after a few frames) is padded with
    zeros to one frame rather than giving none."""
    if len(audio) < frame_length:
        audio = np.pad(audio, (0, frame_length - len(audio)))
    count = (len(audio) - frame_length) // hop_length + 1
    index = np.arange(frame_length)[None, :] + hop_length * np.arange(count)[:, None]
    return audio[index] * np.hamming(frame_length)[None, :]


def warped_frequencies(count: int, alpha: float) -> np.ndarray:
    """[count] linear frequencies (radians, 0..pi) at ``count`` evenly spaced warped
    frequencies, through the first-order all-pass ``(z^-1 - alpha) / (1 - alpha z^-1)``."""
    warped = np.linspace(0.0, math.pi, count)
    return warped - 2.0 * np.arctan(alpha * np.sin(warped) / (1.0 + alpha * np.cos(warped)))


def mel_cepstrum(audio: np.ndarray, settings: FeatureSettings = FEATURES, *, order: int = MCEP_ORDER,
                 alpha: float = MCEP_ALPHA) -> np.ndarray:
    """[T, order + 1] mel-cepstra c_0..c_order: ``log |X(w)| = sum_m c_m cos(m w~)`` with w~ the
    all-pass-warped frequency (SPTK's convention; ``alpha = 0`` gives the real cepstrum)."""
    framed = frames(audio, settings.n_fft, settings.hop_length)  # [T, n_fft]
    power = np.abs(np.fft.rfft(framed, axis=1)) ** 2  # [T, n_fft / 2 + 1]
    log_amplitude = 0.5 * np.log(np.maximum(power, 1e-10))
    bins = np.linspace(0.0, math.pi, power.shape[1])
    grid = warped_frequencies(power.shape[1], alpha)
    warped = np.array([np.interp(grid, bins, row) for row in log_amplitude]).reshape(log_amplitude.shape)
    # The cosine coefficients on [0, pi] (trapezoidal rule): c_0 = mean, c_m = 2 x the projection.
    theta = np.linspace(0.0, math.pi, power.shape[1])
    weights = np.full(power.shape[1], 1.0 / (power.shape[1] - 1))
    weights[[0, -1]] *= 0.5
    basis = np.cos(np.outer(np.arange(order + 1), theta)) * weights  # [order + 1, K]
    cepstra = warped @ basis.T
    cepstra[:, 1:] *= 2.0
    return cepstra


def _aligned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` ([T1, D], [T2, D]) gathered along their DTW path: two [P, D] arrays."""
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"cannot align an empty sequence (frames: {len(x)} and {len(y)}); the "
                         "audio is shorter than one analysis frame")
    _, path = dtw(x, y)
    return x[path[:, 0]], y[path[:, 1]]


def mcd(synthesized: np.ndarray, reference: np.ndarray, settings: FeatureSettings = FEATURES) -> float:
    """Mel cepstral distortion in dB along the DTW path, as ESPnet's evaluation computes it."""
    x, y = _aligned(mel_cepstrum(synthesized, settings), mel_cepstrum(reference, settings))
    return float(np.mean(_DB * np.sqrt(2.0 * np.sum((x - y) ** 2, axis=1))))


def msd(synthesized: np.ndarray, reference: np.ndarray, settings: FeatureSettings = FEATURES) -> float:
    """Mean Euclidean distance of the log-mel frames along their DTW path."""
    x, y = _aligned(log_mel_spectrum(synthesized, settings), log_mel_spectrum(reference, settings))
    return float(np.mean(np.sqrt(np.sum((x - y) ** 2, axis=1))))


def cab_mcd(synthesized: np.ndarray, reference: np.ndarray, settings: FeatureSettings = FEATURES) -> float:
    """CAB's MCD: DTW distance between MFCC sequences per synthesized frame."""
    synthesized_mfcc = mfcc(synthesized, settings)
    total, _ = dtw(synthesized_mfcc, mfcc(reference, settings))
    return total / synthesized_mfcc.shape[0]


def cab_msd(synthesized: np.ndarray, reference: np.ndarray, settings: FeatureSettings = FEATURES) -> float:
    """CAB's MSD: DTW distance between log-mel sequences per synthesized frame."""
    synthesized_mel = log_mel_spectrum(synthesized, settings)
    total, _ = dtw(synthesized_mel, log_mel_spectrum(reference, settings))
    return total / synthesized_mel.shape[0]
