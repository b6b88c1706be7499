using System.Globalization;
using LoraSharp.Models.StableDiffusion;

namespace LoraSharp.Training.Diffusion;

/// <summary>What the memory planner chose and why.</summary>
public sealed record MemoryPlan(
    bool GradientCheckpointing, bool CacheLatents, bool EightBitOptimizer, long ExpectedPeakBytes, long AvailableBytes, IReadOnlyList<string> Notes)
{
    public override string ToString() =>
        $"memory plan: gradient checkpointing {(GradientCheckpointing ? "on" : "off")}, latent caching {(CacheLatents ? "on" : "off")}, " +
        $"8-bit optimizer states {(EightBitOptimizer ? "on" : "off")}; expected peak {Gb(ExpectedPeakBytes)} of {Gb(AvailableBytes)} available" +
        (Notes.Count > 0 ? " (" + string.Join("; ", Notes) + ")" : "");

    internal static string Gb(long b) => (b / 1e9).ToString("0.00", CultureInfo.InvariantCulture) + " GB";
}

/// <summary>Inputs of the estimate.</summary>
public sealed record MemoryPlanInput
{
    public required UNetConfig Unet { get; init; }
    /// <summary>Bytes of all loaded model weights (UNet, text encoders, VAE).</summary>
    public required long ModelBytes { get; init; }
    public required long AdapterParameters { get; init; }
    public required int BatchSize { get; init; }
    /// <summary>Largest bucket in pixels.</summary>
    public required (int W, int H) MaxImageSize { get; init; }
    /// <summary>Bytes per activation element (4 for float32, 2 for bf16/fp16).</summary>
    public required int ActivationBytes { get; init; }
    public required string Optimizer { get; init; }
    public int TextTokens { get; init; } = 77;
}

/// <summary>
/// <c>--auto-memory</c>: estimates the training peak (weights + adapter, gradients and optimizer states + UNet
/// activations kept for backward) and turns on, in this order, latent caching (always: no VAE pass in the step),
/// gradient checkpointing (activations → block inputs + one block's recomputation) and 8-bit AdamW states until
/// the estimate fits 85% of the available memory (CPU: /proc/meminfo MemAvailable).
/// </summary>
public static class MemoryPlanner
{
    /// <summary>MemAvailable from /proc/meminfo (bytes), or the GC's view of the machine when it cannot be read.</summary>
    public static long AvailableBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
                {
                    var kb = long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture);
                    return kb * 1024;
                }
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
    }

    /// <summary>Activation bytes the UNet keeps for backward (plain graph) and with block checkpointing.</summary>
    public static (long Plain, long Checkpointed) ActivationEstimate(UNetConfig c, int batch, int latentH, int latentW, int elem, int tokens)
    {
        long plain = 0, stored = 0, peakBlock = 0;
        int levels = c.BlockOutChannels.Length;
        void Level(int level, int resnets, bool attention, int h, int w)
        {
            long ch = c.BlockOutChannels[level];
            long hw = (long)h * w;
            long heads = c.AttentionHeads[Math.Min(level, c.AttentionHeads.Length - 1)];
            long resnet = 9 * ch * hw;                                     // norms, activations, convs, residual
            long depth = c.TransformerLayersPerBlock[Math.Min(level, c.TransformerLayersPerBlock.Length - 1)];
            long attn = attention ? depth * (16 * ch * hw + 12 * ch * hw     // norms, q/k/v/out, GEGLU (8·C) and projections
                + 2 * heads * hw * hw + 2 * heads * hw * tokens) + 4 * ch * hw : 0; // self/cross attention maps, proj_in/out
            plain += resnets * (resnet + attn);
            stored += resnets * (attention ? 4 : 2) * ch * hw;
            peakBlock = Math.Max(peakBlock, Math.Max(resnet, attn));
        }
        int hh = latentH, ww = latentW;
        for (int i = 0; i < levels; i++)
        {
            bool att = c.DownBlockTypes[i].StartsWith("CrossAttn", StringComparison.Ordinal);
            Level(i, c.LayersPerBlock[i], att, hh, ww);
            if (i < levels - 1) { hh = (hh + 1) / 2; ww = (ww + 1) / 2; }
        }
        Level(levels - 1, 2, true, hh, ww); // mid block (two resnets, one transformer counted per resnet → slight overestimate)
        for (int i = 0; i < levels; i++)
        {
            int level = levels - 1 - i;
            bool att = c.UpBlockTypes[i].StartsWith("CrossAttn", StringComparison.Ordinal);
            Level(level, c.LayersPerBlock[level] + 1, att, hh, ww);
            if (i < levels - 1) { hh *= 2; ww *= 2; }
        }
        return (plain * batch * elem, (stored + peakBlock) * batch * elem);
    }

    public static MemoryPlan Plan(MemoryPlanInput input, long? availableBytes = null, bool forceCheckpointing = false, bool forceCache = false)
    {
        long available = availableBytes ?? AvailableBytes();
        long budget = (long)(available * 0.85);
        var notes = new List<string>();
        var (plainAct, ckptAct) = ActivationEstimate(input.Unet, input.BatchSize, input.MaxImageSize.H / 8, input.MaxImageSize.W / 8, input.ActivationBytes, input.TextTokens);
        long adapter = input.AdapterParameters * 4;
        bool adamLike = input.Optimizer is "AdamW" or "AdamW8bit" or "Prodigy";
        long StateBytes(bool eight) => input.Optimizer switch
        {
            "AdamW" => eight ? input.AdapterParameters * 2 + input.AdapterParameters / 32 : 2 * adapter,
            "AdamW8bit" => input.AdapterParameters * 2 + input.AdapterParameters / 32,
            "Prodigy" => 4 * adapter,
            "Lion" => adapter,
            _ => adapter,
        };
        long overhead = 400L << 20; // libtorch, .NET runtime, allocator slack
        bool ckpt = forceCheckpointing, eight = input.Optimizer == "AdamW8bit";
        long Peak() => input.ModelBytes + adapter * 2 + StateBytes(eight) + (ckpt ? ckptAct : plainAct) + overhead;
        bool cache = true;
        if (forceCache) notes.Add("latent caching requested");
        if (Peak() > budget && !ckpt) { ckpt = true; notes.Add($"activations {MemoryPlan.Gb(plainAct)} → {MemoryPlan.Gb(ckptAct)} with checkpointing"); }
        if (Peak() > budget && input.Optimizer == "AdamW" && !eight) { eight = true; notes.Add("AdamW states in 8 bits"); }
        if (Peak() > budget) notes.Add("WARNING: the estimate still exceeds the budget; lower the resolution or the batch size");
        _ = adamLike;
        return new MemoryPlan(ckpt, cache, eight, Peak(), available, notes);
    }
}
