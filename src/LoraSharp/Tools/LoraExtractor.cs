using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

public sealed class ExtractOptions
{
    /// <summary>Rank of Linear and 1×1 conv modules (kohya --dim).</summary>
    public int Rank { get; init; } = 4;
    /// <summary>Rank of k×k convs (kohya --conv_dim); null = k×k convs are not extracted.</summary>
    public int? ConvRank { get; init; }
    /// <summary>Quantile of |factor| values both factors are clamped to (kohya --clamp_quantile); 1 = no clamp.</summary>
    public double ClampQuantile { get; init; } = 0.99;
    /// <summary>Text encoders are skipped when no weight differs by more than this (kohya --min_diff).</summary>
    public double MinDiff { get; init; } = 0.01;
    /// <summary>Dynamic rank per module (the resize rules), capped at <see cref="Rank"/> / <see cref="ConvRank"/>.</summary>
    public DynamicRankMethod Dynamic { get; init; }
    public double DynamicValue { get; init; }
    public SvdMethod SvdMethod { get; init; } = SvdMethod.Auto;
    public long Seed { get; init; }
    public ScalarType? SaveDType { get; init; }
    public Device? Device { get; init; }
}

/// <summary>One extracted module: its rank, the share of ‖ΔW‖²_F the rank keeps (before clamping), and how its SVD was computed.</summary>
public sealed record ExtractModuleReport(string Module, long[] Shape, int Rank, double EnergyRetained, SvdMethod Method, double Seconds);

public sealed class ExtractReport
{
    public required string Output { get; init; }
    public required IReadOnlyList<ExtractModuleReport> Modules { get; init; }
    /// <summary>max |ΔW| over the text encoders' targets (NaN without text encoders).</summary>
    public double TextEncoderMaxDiff { get; init; } = double.NaN;
    public bool TextEncoderSkipped { get; init; }
    public required double Seconds { get; init; }
}

/// <summary>
/// kohya's <c>extract_lora_from_models.py</c>: ΔW = W_tuned − W_base for every module a LoRA network targets, truncated SVD,
/// <c>up = U·S</c>, <c>down = Vh</c>, quantile clamp, alpha = rank. One module at a time from the memory-mapped models;
/// the truncated SVD is randomized where that equals the full SVD to tolerance (<see cref="LowRank.Svd"/>).
/// SD models give a kohya-layout file, LLMs a PEFT folder.
/// </summary>
public static class LoraExtractor
{
    public static ExtractReport Extract(string basePath, string tunedPath, string output, ExtractOptions? options = null)
    {
        var o = options ?? new ExtractOptions();
        if (o.Rank < 1 || o.ConvRank is < 1) throw new LoraSharpException("ranks must be at least 1", null, "--rank");
        var total = Stopwatch.StartNew();
        using var baseModel = ModelCheckpoint.Open(basePath);
        using var tuned = ModelCheckpoint.Open(tunedPath);
        if (baseModel.IsStableDiffusion != tuned.IsStableDiffusion)
            throw new LoraSharpException("the base and tuned models are of different kinds (Stable Diffusion vs language model)", tunedPath);
        var targets = baseModel.LoraTargets(withConv: o.ConvRank is not null);
        foreach (var t in targets)
        {
            if (!tuned.Weights.TryGetValue(t, out var loc))
                throw new LoraSharpException($"the tuned model has no module '{t}' (the base has it)", tunedPath, t);
            if (!loc.ModuleShape.SequenceEqual(baseModel.Weights[t].ModuleShape))
                throw new LoraSharpException($"module '{t}' is [{string.Join(", ", loc.ModuleShape)}] in the tuned model but [{string.Join(", ", baseModel.Weights[t].ModuleShape)}] in the base", tunedPath, t);
        }

        double teMax = double.NaN;
        bool skipTe = false;
        var teTargets = targets.Where(t => t.StartsWith("text_encoder", StringComparison.Ordinal)).ToList();
        if (baseModel.IsStableDiffusion && teTargets.Count > 0)
        {
            teMax = 0;
            foreach (var t in teTargets)
            {
                using var scope = NewDisposeScope();
                var d = tuned.LoadWeight(t, ScalarType.Float32, o.Device).sub(baseModel.LoadWeight(t, ScalarType.Float32, o.Device));
                teMax = Math.Max(teMax, d.abs().max().item<float>());
            }
            skipTe = teMax < o.MinDiff;
            if (skipTe) targets = targets.Where(t => !t.StartsWith("text_encoder", StringComparison.Ordinal)).ToList();
        }

        var modules = new List<ModuleAdapterWeights>();
        var reports = new List<ExtractModuleReport>();
        try
        {
            foreach (var t in targets)
            {
                using var scope = NewDisposeScope();
                var delta = tuned.LoadWeight(t, ScalarType.Float32, o.Device).sub(baseModel.LoadWeight(t, ScalarType.Float32, o.Device));
                var (down, up, report) = ExtractModule(t, delta, o);
                modules.Add(new ModuleAdapterWeights
                {
                    ModulePath = t,
                    Algorithm = AdapterAlgorithm.LoRA,
                    Tensors = new Dictionary<string, Tensor> { ["lora_down"] = down.MoveToOuterDisposeScope(), ["lora_up"] = up.MoveToOuterDisposeScope() },
                    Alpha = report.Rank,
                    Convention = baseModel.IsStableDiffusion ? ScaleConvention.LyCORIS : ScaleConvention.Peft,
                });
                reports.Add(report);
            }
            var name = Path.GetFileNameWithoutExtension(output.TrimEnd('/', '\\'));
            var weights = new AdapterWeights { Name = name, Modules = modules }; // modules are disposed below
            if (baseModel.IsStableDiffusion)
            {
                string dim = o.Dynamic == DynamicRankMethod.None ? o.Rank.ToString(CultureInfo.InvariantCulture) : "Dynamic";
                string alpha = o.Dynamic == DynamicRankMethod.None ? ((double)o.Rank).ToString("0.0", CultureInfo.InvariantCulture) : "Dynamic";
                var args = new Dictionary<string, string>();
                if (o.ConvRank is { } cr)
                {
                    args["conv_dim"] = cr.ToString(CultureInfo.InvariantCulture);
                    args["conv_alpha"] = ((double)cr).ToString("0.0", CultureInfo.InvariantCulture);
                }
                var meta = new Dictionary<string, string>(StringComparer.Ordinal)
                {
                    ["ss_network_module"] = "networks.lora",
                    ["ss_network_dim"] = dim,
                    ["ss_network_alpha"] = alpha,
                    ["ss_network_args"] = args.Count == 0 ? "" : JsonSerializer.Serialize(args),
                    ["ss_training_comment"] = $"extracted by lorasharp from {Path.GetFileName(tunedPath.TrimEnd('/', '\\'))} − {Path.GetFileName(basePath.TrimEnd('/', '\\'))}"
                        + (o.Dynamic == DynamicRankMethod.None ? "" : $"; dynamic {LowRank.Name(o.Dynamic)} {o.DynamicValue.ToString(CultureInfo.InvariantCulture)}"),
                    ["modelspec.title"] = name,
                };
                if (baseModel.Family is Models.StableDiffusion.StableDiffusionFamily.SD2) meta["ss_v2"] = "True";
                KohyaAdapterWriter.Write(output, weights, new KohyaWriteOptions { SaveDType = o.SaveDType, NameOf = baseModel.KohyaNameOf, Metadata = meta });
            }
            else
            {
                PeftAdapterWriter.WritePeftFolder(output, weights, new PeftWriteOptions { SaveDType = o.SaveDType, BaseModelNameOrPath = Path.GetFullPath(basePath), TaskType = "CAUSAL_LM" });
            }
            return new ExtractReport
            {
                Output = output,
                Modules = reports,
                TextEncoderMaxDiff = teMax,
                TextEncoderSkipped = skipTe,
                Seconds = total.Elapsed.TotalSeconds,
            };
        }
        finally
        {
            foreach (var m in modules) m.Dispose();
        }
    }

    /// <summary>
    /// One module: ΔW (module-shaped) → <c>(down, up)</c> in the LoRA layout of the module ([r, in(, kh, kw)], [out, r(, 1, 1)]).
    /// </summary>
    public static (Tensor Down, Tensor Up, ExtractModuleReport Report) ExtractModule(string module, Tensor delta, ExtractOptions o)
    {
        var sw = Stopwatch.StartNew();
        using var scope = NewDisposeScope();
        var shape = delta.shape;
        bool conv = shape.Length == 4;
        bool kxk = conv && (shape[2] > 1 || shape[3] > 1);
        long outF = shape[0], inF = shape[1];
        var m = delta.to_type(ScalarType.Float32).reshape(outF, -1);
        int maxRank = (int)Math.Min(kxk ? o.ConvRank ?? o.Rank : o.Rank, Math.Min(inF, outF));
        long full = Math.Min(m.shape[0], m.shape[1]);
        Tensor up, down;
        double energy;
        SvdMethod used;
        int rank;
        double total = m.square().sum().to_type(ScalarType.Float64).item<double>();
        if (total == 0)
        {
            rank = o.Dynamic == DynamicRankMethod.None ? maxRank : 1;
            up = zeros(outF, rank, device: m.device);
            down = zeros(rank, m.shape[1], device: m.device);
            energy = 1;
            used = SvdMethod.Full;
        }
        else
        {
            // Dynamic rules look at all singular values: full SVD.
            var method = o.Dynamic == DynamicRankMethod.None ? o.SvdMethod : SvdMethod.Full;
            using var svd = LowRank.Svd(m, o.Dynamic == DynamicRankMethod.None ? maxRank : full, method, o.Seed);
            used = svd.Method;
            var s = svd.S.to_type(ScalarType.Float64).data<double>().ToArray();
            rank = o.Dynamic == DynamicRankMethod.None ? Math.Min(maxRank, s.Length) : LowRank.ChooseRank(s, full, maxRank, o.Dynamic, o.DynamicValue);
            up = svd.U[.., ..rank].mul(svd.S[..rank].unsqueeze(0)).contiguous();
            down = svd.Vh[..rank].contiguous();
            energy = s.Take(rank).Sum(x => x * x) / svd.TotalEnergy;
            if (o.ClampQuantile < 1) LowRank.ClampQuantile(up, down, o.ClampQuantile);
        }
        if (conv)
        {
            up = up.reshape(outF, rank, 1, 1);
            down = down.reshape(rank, inF, shape[2], shape[3]);
        }
        var report = new ExtractModuleReport(module, shape, rank, energy, used, sw.Elapsed.TotalSeconds);
        return (down.MoveToOuterDisposeScope(), up.MoveToOuterDisposeScope(), report);
    }
}
