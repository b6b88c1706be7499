using System.Globalization;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

/// <summary>How several LoRAs become one.</summary>
public enum CombineMethod
{
    /// <summary>Factor-wise weighted sum (same ranks). kohya merge_lora / PEFT "linear". Not the sum of the ΔWs.</summary>
    Linear,
    /// <summary>Concatenate along the rank. kohya --concat / PEFT "cat".</summary>
    Concat,
    /// <summary>Sum the full ΔWs and re-factor with a truncated SVD. kohya svd_merge_lora / PEFT "svd".</summary>
    Svd,
    /// <summary>PEFT: magnitude prune → sign election → disjoint merge, on the A and B stacks.</summary>
    Ties,
    /// <summary>PEFT: DARE random prune (rescaled) → weighted sum.</summary>
    DareLinear,
    /// <summary>PEFT: DARE random prune → sign election → disjoint merge.</summary>
    DareTies,
    /// <summary>PEFT: magnitude prune → weighted sum.</summary>
    MagnitudePrune,
}

/// <summary>Whose rules a combination follows.</summary>
public enum CombineSemantics
{
    /// <summary>PEFT when every input is a PEFT folder, else kohya.</summary>
    Auto,
    /// <summary>kohya sd-scripts merge_lora.py / svd_merge_lora.py (ratios).</summary>
    Kohya,
    /// <summary>PEFT <c>add_weighted_adapter</c> (weights).</summary>
    Peft,
}

public sealed class CombineOptions
{
    public CombineMethod Method { get; init; } = CombineMethod.Linear;
    public CombineSemantics Semantics { get; init; } = CombineSemantics.Auto;
    /// <summary>SVD rank (kohya --new_rank, PEFT svd_rank); default: the largest input rank.</summary>
    public int? Rank { get; init; }
    /// <summary>SVD rank of k×k convs (kohya --new_conv_rank); default: <see cref="Rank"/>.</summary>
    public int? ConvRank { get; init; }
    /// <summary>Quantile clamp of the SVD factors; null = kohya's 0.99 under kohya rules, none under PEFT rules (svd_clamp).</summary>
    public double? ClampQuantile { get; init; }
    /// <summary>Density of ties / dare / magnitude_prune.</summary>
    public double Density { get; init; } = 1.0;
    /// <summary>"total" or "frequency".</summary>
    public string MajoritySign { get; init; } = "total";
    /// <summary>Seed of the DARE masks (and randomized SVD sketches).</summary>
    public long Seed { get; init; }
    /// <summary>Base model: resolves kohya names to module paths (needed to mix layouts); optional.</summary>
    public string? ModelPath { get; init; }
    public ScalarType? SaveDType { get; init; }
    public SvdMethod SvdMethod { get; init; } = SvdMethod.Auto;
}

public sealed class CombineResult : IDisposable
{
    public required AdapterWeights Weights { get; init; }
    public required CombineSemantics Semantics { get; init; }
    public required IReadOnlyList<CoverageReport> Coverage { get; init; }
    public PeftAdapterConfig? FirstPeftConfig { get; init; }
    public Func<string, string?>? KohyaNameOf { get; init; }
    public void Dispose() => Weights.Dispose();
}

/// <summary>
/// Combines several LoRAs into one, with the exact semantics of kohya's <c>merge_lora.py</c> / <c>svd_merge_lora.py</c>
/// (kohya-layout files) or PEFT's <c>add_weighted_adapter</c> (PEFT folders). Module by module, in float32.
/// </summary>
public static class LoraCombiner
{
    /// <summary>Reads, combines and writes (kohya layout for kohya semantics, PEFT folder for PEFT semantics).</summary>
    public static CombineResult CombineFiles(IReadOnlyList<LoraInput> inputs, string output, CombineOptions options)
    {
        var result = Combine(inputs, options);
        try
        {
            if (result.Semantics == CombineSemantics.Kohya)
            {
                var modules = result.Weights.Modules;
                string Unique(IEnumerable<double> v) { var d = v.Distinct().ToList(); return d.Count == 1 ? Num(d[0]) : "Dynamic"; }
                var meta = new Dictionary<string, string>(StringComparer.Ordinal)
                {
                    ["ss_network_dim"] = Unique(modules.Select(m => (double)AdapterScales.RankFor(m))),
                    ["ss_network_alpha"] = Unique(modules.Select(m => m.Alpha ?? AdapterScales.RankFor(m))),
                    ["modelspec.merged_from"] = string.Join(", ", inputs.Select(i => $"{Path.GetFileNameWithoutExtension(i.Path.TrimEnd('/', '\\'))}:{Num(i.Ratio)}")),
                    ["modelspec.title"] = Path.GetFileNameWithoutExtension(output),
                    ["ss_training_comment"] = $"merged by lorasharp merge-loras ({options.Method}, kohya rules)",
                };
                KohyaAdapterWriter.Write(output, result.Weights, new KohyaWriteOptions { SaveDType = options.SaveDType, NameOf = result.KohyaNameOf, Metadata = meta });
            }
            else
            {
                PeftAdapterWriter.WritePeftFolder(output, result.Weights, new PeftWriteOptions
                {
                    SaveDType = options.SaveDType,
                    BaseModelNameOrPath = result.FirstPeftConfig?.BaseModelNameOrPath,
                    TaskType = result.FirstPeftConfig?.TaskType,
                });
            }
            return result;
        }
        catch
        {
            result.Dispose();
            throw;
        }
    }

    /// <summary>Parses linear, concat/cat, svd, ties, dare_linear, dare_ties, magnitude_prune (PEFT's combination_type names).</summary>
    public static CombineMethod ParseMethod(string name) => name.ToLowerInvariant().Replace('-', '_') switch
    {
        "linear" => CombineMethod.Linear,
        "concat" or "cat" => CombineMethod.Concat,
        "svd" => CombineMethod.Svd,
        "ties" => CombineMethod.Ties,
        "dare_linear" => CombineMethod.DareLinear,
        "dare_ties" => CombineMethod.DareTies,
        "magnitude_prune" => CombineMethod.MagnitudePrune,
        _ => throw new LoraSharpException($"unknown method '{name}' (expected linear, concat, svd, ties, dare_linear, dare_ties, magnitude_prune)", null, "--method"),
    };

    static string Num(double v) => v.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>Combines in memory; the caller disposes the result.</summary>
    public static CombineResult Combine(IReadOnlyList<LoraInput> inputs, CombineOptions options)
    {
        if (inputs.Count == 0) throw new LoraSharpException("no LoRA to combine", null);
        ModelCheckpoint? model = options.ModelPath is null ? null : ModelCheckpoint.Open(options.ModelPath);
        var loaded = new List<AdapterLoadResult>();
        try
        {
            foreach (var input in inputs)
                loaded.Add(AdapterFile.Read(input.Path, model?.Index, new AdapterReadOptions { Lenient = model is null }));
            for (int i = 0; i < loaded.Count; i++)
                if (model is null && loaded[i].Coverage.UnmatchedCount > 0)
                    throw new LoraSharpException($"{loaded[i].Coverage.UnmatchedCount} keys are not adapter keys\n{loaded[i].Coverage.ToText()}", inputs[i].Path);

            var semantics = options.Semantics;
            if (semantics == CombineSemantics.Auto)
                semantics = inputs.All(i => AdapterFile.Locate(i.Path).ConfigFile is not null) ? CombineSemantics.Peft : CombineSemantics.Kohya;
            if (semantics == CombineSemantics.Kohya && options.Method is not (CombineMethod.Linear or CombineMethod.Concat or CombineMethod.Svd))
                throw new LoraSharpException($"method {options.Method} exists only under PEFT rules (add_weighted_adapter); kohya's tools offer linear, concat and svd", inputs[0].Path);

            var paths = loaded.SelectMany(l => l.Weights.Modules.Select(m => m.ModulePath)).Distinct().Order(StringComparer.Ordinal).ToList();
            var byPath = loaded.Select(l => l.Weights.Modules.ToDictionary(m => m.ModulePath, StringComparer.Ordinal)).ToList();
            var adapterRanks = loaded.Select(l => l.PeftConfig?.R ?? l.Weights.Modules.Select(AdapterScales.RankFor).DefaultIfEmpty(1).Max()).ToList();
            using var generator = new Generator((ulong)options.Seed);
            if (semantics == CombineSemantics.Peft && options.Method is CombineMethod.Linear or CombineMethod.Ties or CombineMethod.DareLinear
                    or CombineMethod.DareTies or CombineMethod.MagnitudePrune && adapterRanks.Distinct().Count() != 1)
                throw new LoraSharpException($"all adapters must have the same r for {options.Method} (ranks {string.Join(", ", adapterRanks)}); use cat or svd", inputs[0].Path);

            var modules = new List<ModuleAdapterWeights>();
            try
            {
                foreach (var path in paths)
                {
                    var present = new List<(ModuleAdapterWeights W, double Ratio, int Index)>();
                    for (int i = 0; i < inputs.Count; i++)
                        if (byPath[i].TryGetValue(path, out var w)) present.Add((w, inputs[i].Ratio, i));
                    var file = inputs[present[0].Index].Path;
                    modules.Add(semantics == CombineSemantics.Kohya
                        ? KohyaModule(path, present, options, file)
                        : PeftModule(path, present, adapterRanks, options, generator, file));
                }
            }
            catch
            {
                foreach (var m in modules) m.Dispose();
                throw;
            }
            var name = string.Join("+", inputs.Select(i => Path.GetFileNameWithoutExtension(i.Path.TrimEnd('/', '\\'))));
            return new CombineResult
            {
                Weights = new AdapterWeights { Name = name, Modules = modules, Metadata = loaded[0].Weights.Metadata },
                Semantics = semantics,
                Coverage = loaded.Select(l => l.Coverage).ToList(),
                FirstPeftConfig = loaded[0].PeftConfig,
                KohyaNameOf = model is null ? p => p : model.KohyaNameOf,
            };
        }
        finally
        {
            foreach (var l in loaded) l.Dispose();
            model?.Dispose();
        }
    }

    static void RequirePlainLora(ModuleAdapterWeights w, string file, string why)
    {
        if (w.Algorithm != AdapterAlgorithm.LoRA || w.Has("lora_mid"))
            throw new LoraSharpException($"module '{w.ModulePath}' is {(w.Algorithm == AdapterAlgorithm.LoRA ? "a Tucker LoCon (lora_mid)" : w.Algorithm.ToString())}; {why} works on plain LoRA factors only (use --method svd)", file, w.ModulePath);
        if (w.Has("dora_scale") || w.Has("magnitude"))
            throw new LoraSharpException($"module '{w.ModulePath}' is DoRA; DoRA is not linear in its factors and cannot be combined", file, w.ModulePath);
    }

    static ModuleAdapterWeights NewLora(string path, Tensor down, Tensor up, double alpha, ScaleConvention convention) => new()
    {
        ModulePath = path,
        Algorithm = AdapterAlgorithm.LoRA,
        Tensors = new Dictionary<string, Tensor> { ["lora_down"] = down, ["lora_up"] = up },
        Alpha = alpha,
        Convention = convention,
    };

    // ------------------------------------------------------------------ kohya

    static ModuleAdapterWeights KohyaModule(string path, List<(ModuleAdapterWeights W, double Ratio, int Index)> present, CombineOptions o, string file)
    {
        if (o.Method == CombineMethod.Svd) return SvdModule(path, present.Select(p => (p.W, p.Ratio)).ToList(), o, file, kohya: true);
        using var scope = NewDisposeScope();

        foreach (var p in present) RequirePlainLora(p.W, file, "kohya merge_lora");
        double Alpha(ModuleAdapterWeights w) => w.Alpha is null or 0 ? w["lora_down"].shape[0] : w.Alpha.Value;
        double baseAlpha = Alpha(present[0].W);
        Tensor? down = null, up = null;
        foreach (var (w, ratio, _) in present)
        {
            double scale = Math.Sqrt(Alpha(w) / baseAlpha) * ratio;
            var d = w["lora_down"].to_type(ScalarType.Float32).mul(scale);
            var u = w["lora_up"].to_type(ScalarType.Float32).mul(Math.Abs(scale));
            if (down is null || up is null) { down = d; up = u; continue; }
            if (o.Method == CombineMethod.Concat)
            {
                down = cat([down, d], 0);
                up = cat([up, u], 1);
            }
            else
            {
                if (!down.shape.SequenceEqual(d.shape))
                    throw new LoraSharpException($"module '{path}' has rank {down.shape[0]} in one file and {d.shape[0]} in another; kohya's linear merge needs equal ranks (use --method concat or svd)", file, path);
                down = down.add(d);
                up = up.add(u);
            }
        }
        // kohya keeps the first file's alpha (also for --concat, where the rank grows).
        return NewLora(path, down!.MoveToOuterDisposeScope(), up!.MoveToOuterDisposeScope(), baseAlpha, ScaleConvention.LyCORIS);
    }

    // ------------------------------------------------------------------ SVD (both)

    /// <summary>
    /// kohya svd_merge_lora: M = Σ ratio·ΔW (ΔW with its own scale), rank min(new_rank, out, in) (conv_rank for k×k), SVD,
    /// up = U·S, down = Vh, clamp at the 0.99 quantile, alpha = rank. PEFT svd: M = Σ w·s·ΔW (s enters squared, as PEFT
    /// does), rank svd_rank or the largest adapter rank, no clamp unless asked.
    /// </summary>
    static ModuleAdapterWeights SvdModule(string path, List<(ModuleAdapterWeights W, double Weight)> present, CombineOptions o, string file,
        bool kohya, int? defaultRank = null)
    {
        using var scope = NewDisposeScope();
        foreach (var (w, _) in present)
            if (w.Has("dora_scale") || w.Has("magnitude"))
                throw new LoraSharpException($"module '{path}' is DoRA; its ΔW depends on the base weight and cannot be re-factored without it", file, path);
        var (outF, fanIn) = AdapterFile.DeltaExtent(present[0].W);
        long[] weightShape = WeightShapeOf(present[0].W, outF, fanIn);
        bool conv = weightShape.Length == 4;
        bool kxk = conv && (weightShape[2] > 1 || weightShape[3] > 1);
        long inChannels = weightShape[1];
        int maxInput = present.Max(p => AdapterScales.RankFor(p.W));
        int requested = (kxk ? o.ConvRank ?? o.Rank : o.Rank) ?? defaultRank ?? maxInput;
        long k = Math.Min(requested, Math.Min(outF, kohya ? inChannels : fanIn));
        var geometry = LoraMerger.Geometry(weightShape);

        Tensor u, s, vh;
        bool factored = present.All(p => p.W.Algorithm == AdapterAlgorithm.LoRA && !p.W.Has("lora_mid"));
        if (factored)
        {
            var lefts = new List<Tensor>();
            var rights = new List<Tensor>();
            foreach (var (w, weight) in present)
            {
                double scale = AdapterScales.Scale(w);
                double c = kohya ? weight * scale : weight * scale * scale;
                long r = w["lora_down"].shape[0];
                lefts.Add(w["lora_up"].to_type(ScalarType.Float32).reshape(outF, r).mul(c));
                rights.Add(w["lora_down"].to_type(ScalarType.Float32).reshape(r, fanIn));
            }
            (u, s, vh) = LowRank.FactoredSvd(cat(lefts.ToArray(), 1), cat(rights.ToArray(), 0));
        }
        else
        {
            var m = zeros(outF, fanIn);
            foreach (var (w, weight) in present)
            {
                using var adapter = AdapterFactory.FromWeights(w, geometry, ScalarType.Float32, m.device);
                using var d = adapter.DeltaWeight();
                double c = kohya ? weight : weight * AdapterScales.Scale(w);
                m.add_(d.reshape(outF, fanIn).mul(c));
            }
            using var svd = LowRank.Svd(m, k, o.SvdMethod, o.Seed);
            (u, s, vh) = (svd.U.alias(), svd.S.alias(), svd.Vh.alias());
        }
        var (up, down) = LowRank.Factors(u, s, vh, k); // more rank than the sum has: zero directions
        up = up.contiguous();
        down = down.contiguous();
        double? clamp = o.ClampQuantile ?? (kohya ? 0.99 : null);
        if (clamp is { } q && q < 1) LowRank.ClampQuantile(up, down, q); // 1 = no clamp
        if (conv)
        {
            up = up.reshape(outF, k, 1, 1);
            down = down.reshape(k, weightShape[1], weightShape[2], weightShape[3]);
        }
        return NewLora(path, down.MoveToOuterDisposeScope(), up.MoveToOuterDisposeScope(), k, kohya ? ScaleConvention.LyCORIS : ScaleConvention.Peft);
    }

    /// <summary>The base weight's shape as far as an adapter shows it: [out, in] or [out, in, kh, kw].</summary>
    static long[] WeightShapeOf(ModuleAdapterWeights w, long outF, long fanIn)
    {
        var t = w.Tensors;
        if (w.Algorithm == AdapterAlgorithm.LoRA)
        {
            var down = t["lora_down"];
            if (t.TryGetValue("lora_mid", out var mid)) return [outF, down.shape[1], mid.shape[2], mid.shape[3]];
            if (down.dim() == 4) return [outF, down.shape[1], down.shape[2], down.shape[3]];
            if (t["lora_up"].dim() == 4) return [outF, fanIn, 1, 1];
            return [outF, fanIn];
        }
        var fourD = t.Values.FirstOrDefault(x => x.dim() == 4);
        if (fourD is null) return [outF, fanIn];
        long kh = fourD.shape[2], kw = fourD.shape[3];
        return [outF, fanIn / (kh * kw), kh, kw];
    }

    // ------------------------------------------------------------------ PEFT

    static ModuleAdapterWeights PeftModule(string path, List<(ModuleAdapterWeights W, double Ratio, int Index)> present, List<int> adapterRanks,
        CombineOptions o, Generator generator, string file)
    {
        if (o.Method == CombineMethod.Svd)
            return SvdModule(path, present.Select(p => (p.W, p.Ratio)).ToList(), o, file, kohya: false, defaultRank: adapterRanks.Max());
        using var scope = NewDisposeScope();
        switch (o.Method)
        {
            case CombineMethod.Concat:
            {
                foreach (var p in present) RequirePlainLora(p.W, file, "cat");
                long total = adapterRanks.Sum();
                var downs = new List<Tensor>();
                var ups = new List<Tensor>();
                foreach (var (w, weight, _) in present)
                {
                    downs.Add(w["lora_down"].to_type(ScalarType.Float32).mul(weight * AdapterScales.Scale(w)));
                    ups.Add(w["lora_up"].to_type(ScalarType.Float32));
                }
                var down = cat(downs.ToArray(), 0);
                var up = cat(ups.ToArray(), 1);
                long have = down.shape[0];
                if (have > total)
                    throw new LoraSharpException($"module '{path}' has rank {have}, more than the adapters' summed r {total}", file, path);
                if (have < total)
                {
                    // PEFT places the present adapters' rows first in a zero [Σr, in] tensor.
                    var padDown = zeros([total - have, .. down.shape[1..]]);
                    var padUp = zeros([up.shape[0], total - have, .. up.shape[2..]]);
                    down = cat([down, padDown], 0);
                    up = cat([up, padUp], 1);
                }
                return NewLora(path, down.MoveToOuterDisposeScope(), up.MoveToOuterDisposeScope(), total, ScaleConvention.Peft);
            }
            default:
            {
                foreach (var p in present) RequirePlainLora(p.W, file, o.Method.ToString());
                var wa = new List<double>();
                var wb = new List<double>();
                var As = new List<Tensor>();
                var Bs = new List<Tensor>();
                foreach (var (w, weight, _) in present)
                {
                    double ws = weight * AdapterScales.Scale(w);
                    double sign = ws >= 0 ? 1 : -1;
                    wa.Add(Math.Sqrt(Math.Abs(ws)) * sign);
                    wb.Add(Math.Sqrt(Math.Abs(ws)));
                    As.Add(w["lora_down"].to_type(ScalarType.Float32));
                    Bs.Add(w["lora_up"].to_type(ScalarType.Float32));
                }
                Tensor Apply(List<Tensor> ts, List<double> ws) => o.Method switch
                {
                    CombineMethod.Linear => TaskArithmetic.WeightedSum(ts, ws),
                    CombineMethod.Ties => TaskArithmetic.Ties(ts, ws, o.Density, o.MajoritySign),
                    CombineMethod.DareLinear => TaskArithmetic.DareLinear(ts, ws, o.Density, generator),
                    CombineMethod.DareTies => TaskArithmetic.DareTies(ts, ws, o.Density, generator, o.MajoritySign),
                    CombineMethod.MagnitudePrune => TaskArithmetic.MagnitudePruneMerge(ts, ws, o.Density),
                    _ => throw new ArgumentOutOfRangeException(nameof(o)),
                };
                foreach (var a in As.Skip(1))
                    if (!a.shape.SequenceEqual(As[0].shape))
                        throw new LoraSharpException($"module '{path}' has different ranks in the adapters; {o.Method} needs equal ranks (use cat or svd)", file, path);
                var down = Apply(As, wa);
                var up = Apply(Bs, wb);
                return NewLora(path, down.MoveToOuterDisposeScope(), up.MoveToOuterDisposeScope(), down.shape[0], ScaleConvention.Peft);
            }
        }
    }
}
