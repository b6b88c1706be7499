using System.Globalization;
using System.Text;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

public sealed class ResizeOptions
{
    /// <summary>New rank (kohya --new_rank); with a dynamic method, the cap.</summary>
    public int Rank { get; init; } = 4;
    /// <summary>New rank of conv modules (kohya --new_conv_rank); default <see cref="Rank"/>.</summary>
    public int? ConvRank { get; init; }
    public DynamicRankMethod Dynamic { get; init; }
    public double DynamicValue { get; init; }
    public ScalarType? SaveDType { get; init; }
    /// <summary>Use torch.linalg.svd of the rebuilt ΔW (kohya's way) instead of the exact factored SVD (for comparison).</summary>
    public bool FullSvd { get; init; }
}

/// <summary>One resized module: ranks, Σ S kept, Frobenius norm kept, S_0 / S_{k−1}.</summary>
public sealed record ResizeModuleReport(string Module, int OldRank, int NewRank, double SumRetained, double FroRetained, double MaxRatio);

public sealed class ResizeReport
{
    public required string Output { get; init; }
    public required IReadOnlyList<ResizeModuleReport> Modules { get; init; }

    /// <summary>kohya's verbose lines (one per module) and a summary.</summary>
    public string ToText()
    {
        var sb = new StringBuilder();
        foreach (var m in Modules)
            sb.AppendLine(CultureInfo.InvariantCulture, $"{m.Module,-90} rank {m.OldRank} → {m.NewRank}  sum(S) retained: {m.SumRetained:P1}, fro retained: {m.FroRetained:P1}, max(S) ratio: {m.MaxRatio:0.0}");
        if (Modules.Count > 0)
            sb.AppendLine(CultureInfo.InvariantCulture, $"{Modules.Count} modules; average fro retained {Modules.Average(m => m.FroRetained):P2}, ranks {Modules.Min(m => m.NewRank)}–{Modules.Max(m => m.NewRank)}");
        return sb.ToString();
    }
}

/// <summary>
/// kohya's <c>resize_lora.py</c>: per module, M = up·down (no scale), SVD, new rank (fixed or dynamic, §7 of the LoRA
/// reference), up = U·S, down = Vh, new alpha = scale·new rank, so the effective ΔW is kept up to the dropped singular
/// values. The SVD of the product is computed exactly from the factors (QR of each, SVD of the r×r core) without
/// forming M. LoRA and LoCon only; the output keeps the input's layout and gets fresh hashes.
/// </summary>
public static class LoraResizer
{
    public static ResizeReport Resize(string input, string output, ResizeOptions? options = null)
    {
        var o = options ?? new ResizeOptions();
        if (o.Rank < 1 || o.ConvRank is < 1) throw new LoraSharpException("ranks must be at least 1", null, "--rank");
        using var loaded = AdapterFile.Read(input, null, new AdapterReadOptions { Lenient = true });
        if (loaded.Coverage.UnmatchedCount > 0)
            throw new LoraSharpException($"{loaded.Coverage.UnmatchedCount} keys are not adapter keys\n{loaded.Coverage.ToText()}", input);
        var modules = new List<ModuleAdapterWeights>();
        var reports = new List<ResizeModuleReport>();
        try
        {
            foreach (var m in loaded.Weights.Modules)
            {
                modules.Add(ResizeModule(m, o, input, out var report));
                reports.Add(report);
            }
            var weights = new AdapterWeights { Name = Path.GetFileNameWithoutExtension(output.TrimEnd('/', '\\')), Modules = modules, Metadata = loaded.Weights.Metadata };
            if (loaded.KeyFormats.Contains(KeyFormat.Peft) && loaded.PeftConfig is not null)
            {
                PeftAdapterWriter.WritePeftFolder(output, weights, new PeftWriteOptions
                {
                    SaveDType = o.SaveDType,
                    BaseModelNameOrPath = loaded.PeftConfig.BaseModelNameOrPath,
                    TaskType = loaded.PeftConfig.TaskType,
                });
            }
            else if (loaded.KeyFormats.Contains(KeyFormat.Kohya))
            {
                KohyaAdapterWriter.Write(output, weights, new KohyaWriteOptions { SaveDType = o.SaveDType, NameOf = p => p, Metadata = Metadata(loaded.Weights, modules, o) });
            }
            else
            {
                PeftAdapterWriter.WriteDiffusersFile(output, weights, o.SaveDType);
            }
            return new ResizeReport { Output = output, Modules = reports };
        }
        finally
        {
            foreach (var m in modules) m.Dispose();
        }
    }

    static Dictionary<string, string> Metadata(AdapterWeights original, List<ModuleAdapterWeights> resized, ResizeOptions o)
    {
        var meta = new Dictionary<string, string>(StringComparer.Ordinal);
        var oldDim = original.Metadata.GetValueOrDefault("ss_network_dim") ?? "?";
        var comment = original.Metadata.GetValueOrDefault("ss_training_comment") ?? "";
        if (o.Dynamic == DynamicRankMethod.None)
        {
            var alphas = resized.Where(m => m.Tensors["lora_down"].dim() == 2).Select(m => m.Alpha ?? 0).GroupBy(a => a)
                .OrderByDescending(g => g.Count()).Select(g => g.Key).DefaultIfEmpty(resized.Select(m => m.Alpha ?? 0).FirstOrDefault()).First();
            string conv = o.ConvRank is { } cr && cr != o.Rank ? $" (conv: {cr})" : "";
            meta["ss_training_comment"] = $"dimension is resized from {oldDim} to {o.Rank}{conv}; {comment}";
            meta["ss_network_dim"] = o.Rank.ToString(CultureInfo.InvariantCulture);
            meta["ss_network_alpha"] = alphas.ToString("R", CultureInfo.InvariantCulture);
        }
        else
        {
            meta["ss_training_comment"] = $"Dynamic resize with {LowRank.Name(o.Dynamic)}: {o.DynamicValue.ToString(CultureInfo.InvariantCulture)} from {oldDim}; {comment}";
            meta["ss_network_dim"] = "Dynamic";
            meta["ss_network_alpha"] = "Dynamic";
        }
        return meta;
    }

    /// <summary>Resizes one LoRA module (new tensors; the input is not changed).</summary>
    public static ModuleAdapterWeights ResizeModule(ModuleAdapterWeights m, ResizeOptions o, string? file, out ResizeModuleReport report)
    {
        if (m.Algorithm != AdapterAlgorithm.LoRA)
            throw new LoraSharpException($"module '{m.ModulePath}' is {m.Algorithm}; resize works on LoRA / LoCon only (a {m.Algorithm} ΔW is not a product of two factors)", file, m.ModulePath);
        if (m.Has("lora_mid"))
            throw new LoraSharpException($"module '{m.ModulePath}' is a Tucker LoCon (lora_mid); resize works on plain LoRA / LoCon factors", file, m.ModulePath);
        using var scope = NewDisposeScope();
        var down0 = m["lora_down"].to_type(ScalarType.Float32);
        var up0 = m["lora_up"].to_type(ScalarType.Float32);
        long r = down0.shape[0], outF = up0.shape[0];
        var left = up0.reshape(outF, r);
        var right = down0.reshape(r, -1);
        long fanIn = right.shape[1];
        bool conv = down0.dim() == 4;
        double scale = AdapterScales.Scale(m);
        int maxRank = conv ? o.ConvRank ?? o.Rank : o.Rank;
        long full = Math.Min(outF, fanIn);

        Tensor u, s, vh;
        if (o.FullSvd)
        {
            var (U, S, Vh) = linalg.svd(left.matmul(right), fullMatrices: false);
            (u, s, vh) = (U, S, Vh);
        }
        else
        {
            (u, s, vh) = LowRank.FactoredSvd(left, right);
        }
        var sv = s.to_type(ScalarType.Float64).data<double>().ToArray();
        int k = (int)Math.Min(LowRank.ChooseRank(sv, full, maxRank, o.Dynamic, o.DynamicValue), full);
        var (up, down) = LowRank.Factors(u, s, vh, k);
        var (sumKept, froKept, ratio) = LowRank.Retained(sv, k);
        report = new ResizeModuleReport(m.ModulePath, (int)r, k, sumKept, froKept, ratio);
        if (conv)
        {
            up = up.reshape(outF, k, 1, 1);
            down = down.reshape([k, .. down0.shape[1..]]);
        }
        var dtype = m["lora_down"].dtype;
        var tensors = new Dictionary<string, Tensor>
        {
            ["lora_down"] = down.contiguous().to_type(dtype).MoveToOuterDisposeScope(),
            ["lora_up"] = up.contiguous().to_type(dtype).MoveToOuterDisposeScope(),
        };
        foreach (var extra in new[] { "dora_scale", "magnitude" })
            if (m.Has(extra)) tensors[extra] = m[extra].clone().MoveToOuterDisposeScope();
        return new ModuleAdapterWeights
        {
            ModulePath = m.ModulePath,
            Algorithm = AdapterAlgorithm.LoRA,
            Tensors = tensors,
            Alpha = scale * k,
            RsLora = false,
            Convention = m.Convention,
            FanInFanOut = m.FanInFanOut,
        };
    }
}
