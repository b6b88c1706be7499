using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>
/// LyCORIS LoHa (FedPara) as pure functions: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · scale with
/// <c>w?a [out, r]</c>, <c>w?b [r, in·kh·kw]</c>. Tucker form (conv): <c>t? [r, r, kh, kw]</c>,
/// <c>w?a [r, out]</c>, <c>w?b [r, in]</c>, each Hadamard factor = Σ t[i,j]·wa[i,o]·wb[j,c].
/// </summary>
public static class LohaMath
{
    /// <summary>The rank that enters alpha/r: <c>hada_w1_b.shape[0]</c>.</summary>
    public static long Rank(Tensor w1b) => w1b.shape[0];

    /// <summary>One Hadamard factor, shaped like the base weight.</summary>
    public static Tensor Factor(Tensor wa, Tensor wb, Tensor? t, LayerGeometry g)
    {
        if (t is null)
        {
            if (wa.shape[0] != g.OutFeatures || wa.shape[1] != wb.shape[0] || wb.numel() != wb.shape[0] * g.FanIn)
                throw new ArgumentException($"LoHa factors [{string.Join(", ", wa.shape)}]·[{string.Join(", ", wb.shape)}] do not fit {g}.");
            using var scope = NewDisposeScope();
            return wa.reshape(g.OutFeatures, -1).matmul(wb.reshape(wb.shape[0], -1)).reshape(g.WeightShape).MoveToOuterDisposeScope();
        }
        if (!g.IsConv) throw new ArgumentException("LoHa Tucker factors (hada_t1/hada_t2) are only valid on a Conv2d.");
        if (wa.shape[1] != g.OutFeatures || wb.shape[1] != g.InFeatures || t.shape[0] != wa.shape[0] || t.shape[1] != wb.shape[0]
            || t.shape[2] != g.KernelSize[0] || t.shape[3] != g.KernelSize[1])
            throw new ArgumentException($"LoHa Tucker shapes t [{string.Join(", ", t.shape)}], a [{string.Join(", ", wa.shape)}], b [{string.Join(", ", wb.shape)}] do not fit {g}.");
        return einsum("ijhw,io,jc->ochw", t, wa, wb);
    }

    public static Tensor DeltaWeight(Tensor w1a, Tensor w1b, Tensor w2a, Tensor w2b, Tensor? t1, Tensor? t2, double scale, LayerGeometry g)
    {
        if ((t1 is null) != (t2 is null)) throw new ArgumentException("LoHa Tucker form needs both hada_t1 and hada_t2.");
        using var scope = NewDisposeScope();
        return Factor(w1a, w1b, t1, g).mul(Factor(w2a, w2b, t2, g)).mul(scale).MoveToOuterDisposeScope();
    }

    /// <summary>y_delta(x) = F(x, ΔW): the bypass forward (LoHa has no cheaper factorised form).</summary>
    public static Tensor Bypass(Tensor x, Tensor w1a, Tensor w1b, Tensor w2a, Tensor w2b, Tensor? t1, Tensor? t2, double scale, LayerGeometry g)
    {
        using var scope = NewDisposeScope();
        return g.Apply(x, DeltaWeight(w1a, w1b, w2a, w2b, t1, t2, scale, g)).MoveToOuterDisposeScope();
    }
}
