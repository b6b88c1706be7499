using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>Full weight difference (LyCORIS "full"/"diff"): ΔW = diff, Δb = diff_b; scale is the multiplier only.</summary>
public static class FullMath
{
    public static Tensor DeltaWeight(Tensor diff, LayerGeometry g)
    {
        if (diff.numel() != g.WeightShape.Aggregate(1L, (a, b) => a * b))
            throw new ArgumentException($"diff has shape [{string.Join(", ", diff.shape)}], expected [{string.Join(", ", g.WeightShape)}] for {g}.");
        return diff.reshape(g.WeightShape);
    }

    /// <summary>y_delta(x) = F(x, diff) + diff_b.</summary>
    public static Tensor Bypass(Tensor x, Tensor diff, Tensor? diffBias, LayerGeometry g) => g.Apply(x, DeltaWeight(diff, g), diffBias);
}

/// <summary>DyLoRA helpers: rank truncation of trained weights (kohya extract_lora_from_dylora, A1111 <c>dyn=</c>).</summary>
public static class DyLoraMath
{
    /// <summary>The first <paramref name="rank"/> ranks: down[:k], up[:, :k] (copies). Alpha stays unchanged, as kohya does.</summary>
    public static (Tensor Down, Tensor Up) Truncate(Tensor down, Tensor up, long rank)
    {
        long r = down.shape[0];
        if (rank < 1 || rank > r) throw new ArgumentOutOfRangeException(nameof(rank), $"Truncation rank must be in 1..{r}, got {rank}.");
        if (up.shape[1] != r) throw new ArgumentException($"lora_up has {up.shape[1]} ranks but lora_down has {r}.");
        return (down.narrow(0, 0, rank).clone(), up.narrow(1, 0, rank).clone());
    }

    /// <summary>A copy of LoRA module weights truncated to <paramref name="rank"/> (lora_down/lora_up/lora_mid; alpha kept).</summary>
    public static ModuleAdapterWeights Truncate(ModuleAdapterWeights weights, long rank)
    {
        if (weights.Algorithm != AdapterAlgorithm.LoRA)
            throw new ArgumentException($"Module '{weights.ModulePath}': only LoRA weights can be rank-truncated, not {weights.Algorithm}.");
        var (d, u) = Truncate(weights["lora_down"], weights["lora_up"], rank);
        var tensors = new Dictionary<string, Tensor> { ["lora_down"] = d, ["lora_up"] = u };
        if (weights.Has("lora_mid")) tensors["lora_mid"] = weights["lora_mid"].narrow(0, 0, rank).narrow(1, 0, rank).clone();
        foreach (var (k, v) in weights.Tensors)
            if (!tensors.ContainsKey(k) && k != "lora_down" && k != "lora_up" && k != "lora_mid") tensors[k] = v.clone();
        return new ModuleAdapterWeights
        {
            ModulePath = weights.ModulePath, Algorithm = weights.Algorithm, Tensors = tensors,
            Alpha = weights.Alpha ?? weights["lora_down"].shape[0], RsLora = weights.RsLora, Convention = weights.Convention,
            FanInFanOut = weights.FanInFanOut, Rank = weights.Rank is null ? null : (int)rank,
        };
    }
}
