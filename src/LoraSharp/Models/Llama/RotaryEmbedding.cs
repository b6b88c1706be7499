using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// Rotary position embedding in HF's "rotate_half" layout: <c>inv_freq[i] = 1 / theta^(2i/d)</c> (rescaled per
/// <see cref="RopeScaling"/>), angles <c>pos * inv_freq</c> duplicated to width d, and
/// <c>q' = q·cos + rotate_half(q)·sin</c> with <c>rotate_half(x) = cat(-x[d/2:], x[:d/2])</c>.
/// </summary>
public sealed class RotaryEmbedding(LlamaConfig config)
{
    readonly int _dim = config.HeadDim;

    /// <summary>The inverse frequencies (length d/2) used when the sequence reaches <paramref name="sequenceLength"/> positions.</summary>
    public float[] InverseFrequencies(long sequenceLength)
    {
        var theta = config.RopeTheta;
        var scaling = config.RopeScaling;
        if (scaling is { Type: "dynamic" } && sequenceLength > config.MaxPositionEmbeddings)
        {
            // Dynamic NTK: grow the base with the sequence length (HF _compute_dynamic_ntk_parameters).
            var f = scaling.Factor;
            theta *= Math.Pow(f * sequenceLength / config.MaxPositionEmbeddings - (f - 1), _dim / (double)(_dim - 2));
        }

        var inv = new float[_dim / 2];
        for (int i = 0; i < inv.Length; i++)
            inv[i] = 1f / MathF.Pow((float)theta, 2 * i / (float)_dim); // float32 like HF's arange().float() / dim

        if (scaling is { Type: "linear" })
            for (int i = 0; i < inv.Length; i++) inv[i] = (float)(inv[i] / scaling.Factor);
        else if (scaling is { Type: "llama3" })
            ApplyLlama3Scaling(inv, scaling);
        return inv;
    }

    /// <summary>Llama 3.1 frequency-dependent scaling: long wavelengths divided by the factor, short kept, a smooth blend between.</summary>
    static void ApplyLlama3Scaling(float[] inv, RopeScaling s)
    {
        double oldContext = s.OriginalMaxPositionEmbeddings;
        double lowFreqWavelen = oldContext / s.LowFreqFactor, highFreqWavelen = oldContext / s.HighFreqFactor;
        for (int i = 0; i < inv.Length; i++)
        {
            double freq = inv[i], wavelen = 2 * Math.PI / freq;
            if (wavelen > lowFreqWavelen)
                inv[i] = (float)(freq / s.Factor);
            else if (wavelen >= highFreqWavelen)
            {
                double smooth = (oldContext / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                inv[i] = (float)((1 - smooth) * freq / s.Factor + smooth * freq);
            }
        }
    }

    /// <summary>cos and sin, each <c>[length, head_dim]</c>, for positions offset..offset+length-1, in <paramref name="dtype"/>.</summary>
    public (Tensor Cos, Tensor Sin) CosSin(long offset, long length, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        var inv = torch.tensor(InverseFrequencies(offset + length), device: device);
        var positions = torch.arange(offset, offset + length, dtype: ScalarType.Float32, device: device);
        var freqs = torch.outer(positions, inv);
        var emb = torch.cat([freqs, freqs], dim: -1);
        var cos = emb.cos().to_type(dtype).MoveToOuterDisposeScope();
        var sin = emb.sin().to_type(dtype).MoveToOuterDisposeScope();
        return (cos, sin);
    }

    /// <summary>
    /// cos and sin, each <c>[batch, 1, seq, head_dim]</c> (broadcast over heads), for explicit positions
    /// <paramref name="positions"/> <c>[batch, seq]</c> (int64), in <paramref name="dtype"/>.
    /// </summary>
    public (Tensor Cos, Tensor Sin) CosSin(Tensor positions, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        long maxPos = positions.numel() == 0 ? 0 : positions.max().item<long>();
        var inv = torch.tensor(InverseFrequencies(maxPos + 1), device: positions.device);
        var freqs = positions.to_type(ScalarType.Float32).unsqueeze(-1) * inv;
        var emb = torch.cat([freqs, freqs], dim: -1).unsqueeze(1);
        var cos = emb.cos().to_type(dtype).MoveToOuterDisposeScope();
        var sin = emb.sin().to_type(dtype).MoveToOuterDisposeScope();
        return (cos, sin);
    }

    /// <summary><c>cat(-x[..., d/2:], x[..., :d/2])</c>.</summary>
    public static Tensor RotateHalf(Tensor x)
    {
        using var scope = NewDisposeScope();
        var half = x.shape[^1] / 2;
        var x1 = x.narrow(-1, 0, half);
        var x2 = x.narrow(-1, half, half);
        return torch.cat([x2.neg(), x1], dim: -1).MoveToOuterDisposeScope();
    }

    /// <summary>Rotates <paramref name="x"/> <c>[batch, heads, seq, d]</c> by cos/sin <c>[seq, d]</c>.</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        return (x * cos + RotateHalf(x) * sin).MoveToOuterDisposeScope();
    }
}
