using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>
/// LyCORIS LoKr (KronA) as pure functions: ΔW = kron(W1, W2)·scale with <c>W1 [a, c]</c> (full <c>lokr_w1</c>
/// or <c>w1_a [a, r]·w1_b [r, c]</c>) and <c>W2 [b, d(, kh, kw)]</c> (full <c>lokr_w2</c>, or
/// <c>w2_a [b, r]·w2_b [r, d·kh·kw]</c>, or Tucker <c>Σ t2[i,j]·w2_a[i,b]·w2_b[j,d]</c>), out = a·b, in = c·d.
/// </summary>
public static class LokrMath
{
    /// <summary>
    /// LyCORIS <c>factorization(n, f)</c>: split n into (m, n/m) with m ≤ n/m. When f &gt; 0 divides n the split is
    /// (min(f, n/f), max(f, n/f)); otherwise the divisor pair closest to √n with m ≤ f (f = -1 means no limit).
    /// </summary>
    public static (long Small, long Large) Factorization(long dimension, long factor = -1)
    {
        if (dimension <= 0) throw new ArgumentOutOfRangeException(nameof(dimension), "Dimension must be positive.");
        if (factor > 0 && dimension % factor == 0)
        {
            long m0 = factor, n0 = dimension / factor;
            return m0 <= n0 ? (m0, n0) : (n0, m0);
        }
        if (factor < 0) factor = dimension;
        long m = 1, n = dimension, length = m + n;
        while (m < n)
        {
            long nm = m + 1;
            while (dimension % nm != 0) nm++;
            long nn = dimension / nm;
            if (nm + nn > length || nm > factor) break;
            m = nm; n = nn; length = m + n;
        }
        return m <= n ? (m, n) : (n, m);
    }

    /// <summary>
    /// The scale: alpha/r (alpha/√r with rsLoRA) where r is the rank of a decomposed factor; under
    /// <see cref="ScaleConvention.LyCORIS"/> 1.0 when neither factor is decomposed. PEFT always uses alpha/r, which
    /// then needs the configured rank (<paramref name="configuredRank"/>).
    /// </summary>
    public static double Scale(double? alpha, long? decomposedRank, long? configuredRank, bool rsLora, ScaleConvention convention)
    {
        if (decomposedRank is null)
        {
            if (convention == ScaleConvention.LyCORIS) return 1.0;
            if (alpha is null or 0) return 1.0;
            if (configuredRank is null)
                throw new ArgumentException("PEFT LoKr with two full factors scales by alpha/r, but the rank is unknown: set ModuleAdapterWeights.Rank.");
            return LoraMath.Scale(alpha, configuredRank.Value, rsLora);
        }
        return LoraMath.Scale(alpha, configuredRank ?? decomposedRank.Value, rsLora);
    }

    /// <summary>W1 [a, c] from the full or the decomposed form.</summary>
    public static Tensor W1(Tensor? w1, Tensor? w1a, Tensor? w1b)
    {
        if (w1 is not null) return w1.alias();
        if (w1a is null || w1b is null) throw new ArgumentException("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b.");
        return w1a.matmul(w1b);
    }

    /// <summary>W2 [b, d] (Linear) or [b, d, kh, kw] (Conv2d) from the full, decomposed or Tucker form.</summary>
    public static Tensor W2(Tensor? w2, Tensor? w2a, Tensor? w2b, Tensor? t2, long b, long d, LayerGeometry g)
    {
        long[] shape = g.IsConv ? [b, d, g.KernelSize[0], g.KernelSize[1]] : [b, d];
        if (w2 is not null)
        {
            if (w2.numel() != shape.Aggregate(1L, (x, y) => x * y))
                throw new ArgumentException($"lokr_w2 has shape [{string.Join(", ", w2.shape)}], expected [{string.Join(", ", shape)}].");
            return w2.reshape(shape);
        }
        if (w2a is null || w2b is null) throw new ArgumentException("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b.");
        if (t2 is not null)
        {
            if (!g.IsConv) throw new ArgumentException("lokr_t2 (Tucker) is only valid on a Conv2d.");
            return einsum("ijhw,ib,jd->bdhw", t2, w2a, w2b);
        }
        using var scope = NewDisposeScope();
        return w2a.matmul(w2b.reshape(w2b.shape[0], -1)).reshape(shape).MoveToOuterDisposeScope();
    }

    public static Tensor DeltaWeight(Tensor? w1, Tensor? w1a, Tensor? w1b, Tensor? w2, Tensor? w2a, Tensor? w2b, Tensor? t2,
        double scale, LayerGeometry g)
    {
        using var scope = NewDisposeScope();
        var k1 = W1(w1, w1a, w1b);
        long a = k1.shape[0], c = k1.shape[1];
        if (g.OutFeatures % a != 0 || g.InFeatures % c != 0)
            throw new ArgumentException($"LoKr W1 [{a}, {c}] does not divide the layer {g}.");
        var k2 = W2(w2, w2a, w2b, t2, g.OutFeatures / a, g.InFeatures / c, g);
        if (g.IsConv) k1 = k1.reshape(a, c, 1, 1);
        return kron(k1, k2).mul(scale).MoveToOuterDisposeScope();
    }

    /// <summary>y_delta(x) = F(x, ΔW).</summary>
    public static Tensor Bypass(Tensor x, Tensor? w1, Tensor? w1a, Tensor? w1b, Tensor? w2, Tensor? w2a, Tensor? w2b, Tensor? t2,
        double scale, LayerGeometry g)
    {
        using var scope = NewDisposeScope();
        return g.Apply(x, DeltaWeight(w1, w1a, w1b, w2, w2a, w2b, t2, scale, g)).MoveToOuterDisposeScope();
    }
}
