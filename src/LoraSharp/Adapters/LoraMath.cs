using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>
/// LoRA / LoCon as pure functions. <c>down</c> (A, PEFT lora_A) is <c>[r, in]</c> or <c>[r, in, kh, kw]</c>,
/// <c>up</c> (B, PEFT lora_B) is <c>[out, r]</c> or <c>[out, r, 1, 1]</c>; the Tucker form (LyCORIS
/// <c>use_tucker</c>) adds <c>mid [r, r, kh, kw]</c> with a 1×1 <c>down [r, in, 1, 1]</c>.
/// ΔW = up·down·scale (conv: as the matrix <c>[out, in·kh·kw]</c>); the bypass forward computes
/// <c>up(down(x))·scale</c> without forming ΔW.
/// </summary>
public static class LoraMath
{
    /// <summary>alpha/r, or alpha/√r with rsLoRA; a missing alpha means alpha = r (kohya, A1111).</summary>
    public static double Scale(double? alpha, long rank, bool rsLora = false)
    {
        if (rank <= 0) throw new ArgumentOutOfRangeException(nameof(rank), $"Rank must be positive, got {rank}.");
        double a = alpha is null or 0 ? rank : alpha.Value;
        return rsLora ? a / Math.Sqrt(rank) : a / rank;
    }

    public static long Rank(Tensor down) => down.shape[0];

    /// <summary>The scaled weight delta, shaped like the base weight.</summary>
    public static Tensor DeltaWeight(Tensor down, Tensor up, Tensor? mid, double scale, LayerGeometry g)
    {
        using var scope = NewDisposeScope();
        long r = down.shape[0];
        CheckShapes(down, up, mid, g);
        var up2 = up.reshape(g.OutFeatures, r).mul(scale); // scale the small factor, not the [out, in] product
        Tensor delta;
        if (mid is null)
            delta = up2.matmul(down.reshape(r, -1)).reshape(g.WeightShape);
        else
            delta = einsum("op,pqhw,qi->oihw", up2, mid, down.reshape(r, g.InFeatures));
        return delta.MoveToOuterDisposeScope();
    }

    /// <summary>x → the r-channel "down" activation (last axis for Linear, channel axis 1 for Conv2d).</summary>
    public static Tensor Down(Tensor x, Tensor down, Tensor? mid, LayerGeometry g)
    {
        long r = down.shape[0];
        if (!g.IsConv) return nn.functional.linear(x, down.reshape(r, g.InFeatures));
        using var scope = NewDisposeScope();
        Tensor h;
        if (mid is null)
            h = nn.functional.conv2d(x, down.reshape(r, g.InFeatures, g.KernelSize[0], g.KernelSize[1]), null, g.Stride, g.Padding, g.Dilation, 1);
        else
        {
            var h1 = nn.functional.conv2d(x, down.reshape(r, g.InFeatures, 1, 1), null, [1, 1], [0, 0], [1, 1], 1);
            h = nn.functional.conv2d(h1, mid, null, g.Stride, g.Padding, g.Dilation, 1);
        }
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>The r-channel activation → output channels (1×1 for Conv2d).</summary>
    public static Tensor Up(Tensor h, Tensor up, LayerGeometry g)
    {
        long r = up.shape[1];
        return g.IsConv
            ? nn.functional.conv2d(h, up.reshape(g.OutFeatures, r, 1, 1), null, [1, 1], [0, 0], [1, 1], 1)
            : nn.functional.linear(h, up.reshape(g.OutFeatures, r));
    }

    /// <summary>y_delta(x) = up(down(x))·scale, the bypass (unmerged) contribution without bias.</summary>
    public static Tensor Bypass(Tensor x, Tensor down, Tensor up, Tensor? mid, double scale, LayerGeometry g)
    {
        using var scope = NewDisposeScope();
        CheckShapes(down, up, mid, g);
        return Up(Down(x, down, mid, g), up, g).mul(scale).MoveToOuterDisposeScope();
    }

    /// <summary>Throws when the factor shapes do not fit the layer.</summary>
    public static void CheckShapes(Tensor down, Tensor up, Tensor? mid, LayerGeometry g, string where = "")
    {
        long r = down.shape[0];
        string at = where.Length > 0 ? where + ": " : "";
        if (up.shape.Length < 2 || up.shape[0] != g.OutFeatures || up.shape[1] != r || up.numel() != g.OutFeatures * r)
            throw new ArgumentException($"{at}lora_up has shape [{string.Join(", ", up.shape)}], expected [{g.OutFeatures}, {r}(, 1, 1)] for {g} with rank {r}.");
        if (mid is null)
        {
            if (down.numel() != r * g.FanIn)
                throw new ArgumentException($"{at}lora_down has shape [{string.Join(", ", down.shape)}], expected [{r}, {g.InFeatures}{(g.IsConv ? $", {g.KernelSize[0]}, {g.KernelSize[1]}" : "")}] for {g}.");
        }
        else
        {
            if (!g.IsConv) throw new ArgumentException($"{at}lora_mid (Tucker) is only valid on a Conv2d, not {g}.");
            if (down.numel() != r * g.InFeatures)
                throw new ArgumentException($"{at}with lora_mid, lora_down must be [{r}, {g.InFeatures}, 1, 1], got [{string.Join(", ", down.shape)}].");
            long[] expect = [r, r, g.KernelSize[0], g.KernelSize[1]];
            if (!mid.shape.SequenceEqual(expect))
                throw new ArgumentException($"{at}lora_mid has shape [{string.Join(", ", mid.shape)}], expected [{string.Join(", ", expect)}].");
        }
    }
}
