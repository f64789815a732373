"""ESPnet2's FastSpeech 2 and Transformer-TTS with every attention module swapped for a zoo member.

The models are ESPnet's own classes, built with the transformer encoder and decoder types (the
conformer variants use relative-position attention, which has no zoo equivalent), then passed
through :func:`tasks.tts.adapter.swap_attention`. Which module serves which role is declared
once, here, as path patterns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask
from espnet2.tts.fastspeech2 import FastSpeech2
from espnet2.tts.transformer import Transformer
from torch import Tensor, nn

from tasks.base import AttentionChoice
from tasks.tts.adapter import swap_attention
from tasks.tts.task import FASTSPEECH2_ROLES, TRANSFORMER_ROLES

# FastSpeech 2's decoder is an ESPnet *encoder* stack (non-autoregressive), hence "encoders".
FASTSPEECH2_MODULES = {r"encoder\.encoders\.\d+\.self_attn": "encoder_self",
                       r"decoder\.encoders\.\d+\.self_attn": "decoder_self"}
TRANSFORMER_MODULES = {r"encoder\.encoders\.\d+\.self_attn": "encoder_self",
                       r"decoder\.decoders\.\d+\.self_attn": "decoder_self",
                       r"decoder\.decoders\.\d+\.src_attn": "cross"}


@dataclass(frozen=True)
class ModelSize:
    """Width and depth shared by both models (ESPnet's argument names)."""

    adim: int = 64
    aheads: int = 2
    elayers: int = 2
    eunits: int = 128
    dlayers: int = 2
    dunits: int = 128
    postnet_layers: int = 2
    postnet_chans: int = 64
    dropout: float = 0.1


def build_fastspeech2(vocabulary_size: int, n_mels: int, size: ModelSize,
                      attention: Mapping[str, AttentionChoice]) -> tuple[FastSpeech2, dict[str, list[str]]]:
    """ESPnet2's FastSpeech 2 (transformer encoder and decoder), attention swapped.

    Returns the model and the replaced module paths per role.
    """
    model = FastSpeech2(
        idim=vocabulary_size, odim=n_mels, adim=size.adim, aheads=size.aheads,
        elayers=size.elayers, eunits=size.eunits, dlayers=size.dlayers, dunits=size.dunits,
        postnet_layers=size.postnet_layers, postnet_chans=size.postnet_chans,
        encoder_type="transformer", decoder_type="transformer",
        duration_predictor_chans=size.adim, pitch_predictor_chans=size.adim,
        energy_predictor_chans=size.adim,
        transformer_enc_dropout_rate=size.dropout, transformer_enc_positional_dropout_rate=size.dropout,
        transformer_dec_dropout_rate=size.dropout, transformer_dec_positional_dropout_rate=size.dropout,
        # No zoo member forms attention weights, so there is nothing to drop out.
        transformer_enc_attn_dropout_rate=0.0, transformer_dec_attn_dropout_rate=0.0,
    )
    replaced = swap_attention(model, FASTSPEECH2_MODULES, attention, FASTSPEECH2_ROLES)
    return model, replaced


def build_transformer(vocabulary_size: int, n_mels: int, size: ModelSize,
                      attention: Mapping[str, AttentionChoice]) -> tuple[Transformer, dict[str, list[str]]]:
    """ESPnet2's Transformer-TTS, attention swapped.

    The guided attention loss is off: it reads softmax attention weights, which efficient
    mechanisms never form. Returns the model and the replaced module paths per role.
    """
    model = Transformer(
        idim=vocabulary_size, odim=n_mels, embed_dim=size.adim, eprenet_conv_chans=size.adim,
        dprenet_units=size.adim, adim=size.adim, aheads=size.aheads, elayers=size.elayers,
        eunits=size.eunits, dlayers=size.dlayers, dunits=size.dunits,
        postnet_layers=size.postnet_layers, postnet_chans=size.postnet_chans,
        transformer_enc_dropout_rate=size.dropout, transformer_enc_positional_dropout_rate=size.dropout,
        transformer_dec_dropout_rate=size.dropout, transformer_dec_positional_dropout_rate=size.dropout,
        transformer_enc_attn_dropout_rate=0.0, transformer_dec_attn_dropout_rate=0.0,
        transformer_enc_dec_attn_dropout_rate=0.0,
        use_guided_attn_loss=False,
    )
    replaced = swap_attention(model, TRANSFORMER_MODULES, attention, TRANSFORMER_ROLES)
    return model, replaced


@torch.no_grad()
def generate_transformer(model: Transformer, tokens: Tensor, *, maxlenratio: float = 10.0,
                         threshold: float = 0.5) -> Tensor:
    """Autoregressive synthesis with ESPnet's Transformer-TTS, re-running the decoder each step.

    ESPnet's ``inference`` caches each layer's past outputs and feeds a one-frame query, which
    assumes softmax attention; here the decoder runs on the whole prefix at every step, which is
    exact for every zoo member (the causal pattern keeps earlier frames unchanged).

    Args:
        model: a Transformer-TTS in eval mode.
        tokens: [N] character ids (without <sos/eos>, which is appended here as ESPnet does).
        maxlenratio: at most ``maxlenratio * (N + 1)`` frames (ESPnet's default 10).
        threshold: stop when the stop-token probability reaches it, from the second frame on
            (one frame is too short for Griffin-Lim to produce any audio).

    Returns:
        [T, n_mels] generated features (after the postnet), in the model's normalised space.
    """
    xs = nn.functional.pad(tokens, [0, 1], "constant", model.eos).unsqueeze(0)  # [1, N + 1]
    memory, _ = model.encoder(xs, None)  # [1, N + 1, adim]
    maxlen = max(2, int(xs.shape[1] * maxlenratio))
    ys = memory.new_zeros(1, 1, model.odim)  # [1, 1, odim]: ESPnet's all-zero go frame
    frames = []
    for t in range(1, maxlen + 1):
        y_masks = subsequent_mask(t, device=xs.device).unsqueeze(0)  # [1, t, t]
        zs, _ = model.decoder(ys, y_masks, memory, None)  # [1, t, adim]
        last = zs[:, -1]  # [1, adim]
        frame = model.feat_out(last).view(model.reduction_factor, model.odim)  # [r, odim]
        frames.append(frame)
        ys = torch.cat([ys, frame[-1].view(1, 1, model.odim)], dim=1)
        if t >= 2 and bool((torch.sigmoid(model.prob_out(last)) >= threshold).any()):
            break
    before = torch.cat(frames).unsqueeze(0).transpose(1, 2)  # [1, odim, T]
    after = before + model.postnet(before) if model.postnet is not None else before
    return after[0].transpose(0, 1)  # [T, odim]
