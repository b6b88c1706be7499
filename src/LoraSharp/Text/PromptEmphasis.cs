using static TorchSharp.torch;

namespace LoraSharp.Text;

/// <summary>A1111's emphasis modes (setting "Emphasis mode").</summary>
public enum EmphasisMode
{
    /// <summary>Multiply each token's output by its weight, then rescale so the mean equals the unweighted mean.</summary>
    Original,
    /// <summary>Multiply by the weights without restoring the mean.</summary>
    NoNorm,
    /// <summary>No emphasis: the hidden states are returned unchanged (and the parser should not parse brackets).</summary>
    None,
}

/// <summary>Emphasis applied to the text encoder's output (A1111 modules/sd_emphasis.py).</summary>
public static class PromptEmphasis
{
    /// <summary>
    /// Applies per-token weights to the text encoder output <paramref name="hidden"/> [B, T, C]:
    /// z' = z · w (broadcast over C); in <see cref="EmphasisMode.Original"/> mode then z' · (mean(z) / mean(z')),
    /// means over the whole tensor. <paramref name="weights"/> has T values (the same for every batch row) or B·T.
    /// </summary>
    public static Tensor Apply(Tensor hidden, float[] weights, EmphasisMode mode = EmphasisMode.Original)
    {
        if (hidden.dim() != 3)
            throw new ArgumentException($"expected hidden states [B, T, C], got [{string.Join(", ", hidden.shape)}]", nameof(hidden));
        long b = hidden.shape[0], t = hidden.shape[1];
        if (weights.Length != t && weights.Length != b * t)
            throw new ArgumentException($"expected {t} or {b * t} weights for hidden states [{string.Join(", ", hidden.shape)}], got {weights.Length}", nameof(weights));
        using var scope = NewDisposeScope();
        var w = tensor(weights, dtype: hidden.dtype, device: hidden.device);
        w = weights.Length == t ? w.reshape(1, t).expand(b, t) : w.reshape(b, t);
        return Apply(hidden, w, mode).MoveToOuterDisposeScope();
    }

    /// <summary>As <see cref="Apply(Tensor, float[], EmphasisMode)"/> with weights as a tensor [B, T].</summary>
    public static Tensor Apply(Tensor hidden, Tensor weights, EmphasisMode mode = EmphasisMode.Original)
    {
        using var scope = NewDisposeScope();
        if (mode == EmphasisMode.None)
            return hidden.clone().MoveToOuterDisposeScope();
        var originalMean = hidden.mean();
        var z = hidden * weights.to(hidden.dtype).unsqueeze(-1).expand_as(hidden);
        if (mode == EmphasisMode.Original)
        {
            // A1111 divides by the new mean; where it is exactly 0 (e.g. a final LayerNorm with zero bias) that is
            // 0/0 = NaN, so the ratio is taken as 1 there instead.
            var newMean = z.mean();
            var ratio = where(newMean.eq(0), ones_like(newMean), originalMean / newMean);
            z = z * ratio;
        }
        return z.MoveToOuterDisposeScope();
    }
}
