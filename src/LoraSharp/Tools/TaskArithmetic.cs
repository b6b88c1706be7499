using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

/// <summary>
/// PEFT's task-arithmetic merges (<c>peft/utils/merge_utils.py</c>) over a list of same-shaped task tensors with one weight
/// each: weighted sum, magnitude pruning (top ⌊d·numel⌋ by |value|), DARE random pruning (Bernoulli(d) mask, rescaled by
/// 1/d), majority sign election ("total": sign of the sum; "frequency": sign of the sum of signs; ties → +1) and the
/// disjoint merge (mean of the weighted values that agree with the majority sign).
/// </summary>
public static class TaskArithmetic
{
    public static Tensor WeightedSum(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights)
    {
        using var scope = NewDisposeScope();
        var stacked = stack(tensors.ToArray(), 0);
        return stacked.mul(Weights(stacked, weights)).sum(0L).MoveToOuterDisposeScope();
    }

    /// <summary>Keeps the ⌊density·numel⌋ largest |values|, zeroes the rest (density ≥ 1: unchanged).</summary>
    public static Tensor MagnitudePrune(Tensor t, double density)
    {
        CheckDensity(density);
        if (density >= 1) return t.alias();
        using var scope = NewDisposeScope();
        long k = (long)(density * t.numel());
        var mask = zeros(t.numel(), dtype: t.dtype, device: t.device);
        if (k > 0)
        {
            var (_, idx) = t.abs().reshape(-1).topk((int)k, largest: true);
            mask.index_fill_(0, idx, 1);
        }
        return t.mul(mask.reshape(t.shape)).MoveToOuterDisposeScope();
    }

    /// <summary>DARE: a Bernoulli(density) mask from <paramref name="generator"/>, optionally rescaled by 1/density.</summary>
    public static Tensor RandomPrune(Tensor t, double density, Generator generator, bool rescale = true)
    {
        CheckDensity(density);
        if (density >= 1) return t.alias();
        using var scope = NewDisposeScope();
        var mask = bernoulli(full_like(t, density), generator);
        var pruned = t.mul(mask);
        if (rescale) pruned = pruned.div(density);
        return pruned.MoveToOuterDisposeScope();
    }

    /// <summary>Elementwise: does each task tensor's sign agree with the majority sign? (stacked on dim 0)</summary>
    public static Tensor MajoritySignMask(Tensor stacked, string method = "total")
    {
        using var scope = NewDisposeScope();
        var sign = stacked.sign();
        var magnitude = method switch
        {
            "total" => stacked.sum(0L),
            "frequency" => sign.sum(0L),
            _ => throw new LoraSharpException($"unknown majority sign method '{method}' (expected total or frequency)", null, "--majority-sign"),
        };
        var majority = where(magnitude.ge(0), ones_like(magnitude), ones_like(magnitude).neg());
        return sign.eq(majority).MoveToOuterDisposeScope();
    }

    public static Tensor DisjointMerge(Tensor weighted, Tensor mask)
    {
        using var scope = NewDisposeScope();
        var m = mask.to_type(weighted.dtype);
        var kept = weighted.mul(m).sum(0L);
        var count = m.sum(0L).clamp_min(1.0);
        return kept.div(count).MoveToOuterDisposeScope();
    }

    /// <summary>magnitude_prune: prune each by magnitude, then weighted sum.</summary>
    public static Tensor MagnitudePruneMerge(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density)
    {
        using var scope = NewDisposeScope();
        return WeightedSum(tensors.Select(t => MagnitudePrune(t, density)).ToList(), weights).MoveToOuterDisposeScope();
    }

    /// <summary>ties: magnitude prune → sign election (on the unweighted pruned tensors) → weight → disjoint merge.</summary>
    public static Tensor Ties(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density, string majoritySign = "total")
    {
        using var scope = NewDisposeScope();
        var stacked = stack(tensors.Select(t => MagnitudePrune(t, density)).ToArray(), 0);
        var mask = MajoritySignMask(stacked, majoritySign);
        return DisjointMerge(stacked.mul(Weights(stacked, weights)), mask).MoveToOuterDisposeScope();
    }

    /// <summary>dare_linear: random prune (rescaled) → weighted sum.</summary>
    public static Tensor DareLinear(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density, Generator generator)
    {
        using var scope = NewDisposeScope();
        return WeightedSum(tensors.Select(t => RandomPrune(t, density, generator)).ToList(), weights).MoveToOuterDisposeScope();
    }

    /// <summary>dare_ties: random prune (rescaled) → sign election → weight → disjoint merge.</summary>
    public static Tensor DareTies(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density, Generator generator, string majoritySign = "total")
    {
        using var scope = NewDisposeScope();
        var stacked = stack(tensors.Select(t => RandomPrune(t, density, generator)).ToArray(), 0);
        var mask = MajoritySignMask(stacked, majoritySign);
        return DisjointMerge(stacked.mul(Weights(stacked, weights)), mask).MoveToOuterDisposeScope();
    }

    static Tensor Weights(Tensor stacked, IReadOnlyList<double> weights)
    {
        var shape = new long[stacked.dim()];
        Array.Fill(shape, 1L);
        shape[0] = weights.Count;
        return tensor(weights.ToArray(), dtype: stacked.dtype, device: stacked.device).reshape(shape);
    }

    static void CheckDensity(double density)
    {
        if (density < 0 || double.IsNaN(density)) throw new LoraSharpException($"density must be ≥ 0, got {density}", null, "--density");
    }
}
