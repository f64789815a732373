"""Spectral distortion between synthesized and reference speech, computed CAB's way.

CAB scores TTS by comparing waveforms: both the synthesized speech and the reference (the
Griffin-Lim resynthesis of the ground-truth spectrogram, so that the vocoder's own artefacts
cancel) are analysed again, aligned by dynamic time warping with a Euclidean frame distance,
and the accumulated distance is divided by the number of synthesized frames:

- MCD: on 13 MFCCs (librosa's, dB-scaled mel power, orthonormal DCT-II);
- MSD: on the 80-band natural-log mel spectrogram.

The classic dB-scale mel cepstral distortion is reported beside them:
``(10 / ln 10) * sqrt(2 * sum_{d=1..24} (c_d - c'_d)^2)`` with cepstra ``c`` of the natural-log
mel power (c_0, the energy, excluded), averaged over the frame pairs of the DTW path.
"""

from __future__ import annotations

import math

import librosa
import numpy as np
from scipy.fft import dct
from scipy.spatial.distance import cdist

from tasks.tts.data import FEATURES, FeatureSettings, mel_basis

MFCC_COEFFICIENTS = 13
CEPSTRAL_ORDER = 24
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


def mel_cepstrum(audio: np.ndarray, settings: FeatureSettings = FEATURES) -> np.ndarray:
    """[T, 25] cepstra c_0..c_24 of the natural-log mel power."""
    log_power = np.log(np.maximum(_mel_power(audio, settings), 1e-10))
    return dct(log_power, type=2, norm="ortho", axis=0)[: CEPSTRAL_ORDER + 1].T


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


def mcd_db(synthesized: np.ndarray, reference: np.ndarray, settings: FeatureSettings = FEATURES) -> float:
    """Classic mel cepstral distortion in dB (c_1..c_24), averaged over the DTW path."""
    x = mel_cepstrum(synthesized, settings)[:, 1:]
    y = mel_cepstrum(reference, settings)[:, 1:]
    _, path = dtw(x, y)
    differences = x[path[:, 0]] - y[path[:, 1]]  # [P, 24]
    return float(np.mean(_DB * np.sqrt(2.0 * np.sum(differences**2, axis=1))))
