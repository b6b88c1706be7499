using System.Globalization;
using System.Text.Json;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

/// <summary>An adapter file (or PEFT folder) and the ratio it is applied with.</summary>
public sealed record LoraInput(string Path, double Ratio)
{
    /// <summary>Parses <c>PATH[:RATIO]</c> (ratio defaults to 1; the last ':' followed by a number is the ratio).</summary>
    public static LoraInput Parse(string text)
    {
        int colon = text.LastIndexOf(':');
        if (colon > 0 && double.TryParse(text[(colon + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture, out var ratio))
            return new LoraInput(text[..colon], ratio);
        return new LoraInput(text, 1.0);
    }
}

/// <summary>Options of <see cref="LoraMerger.MergeIntoModel"/>.</summary>
public sealed class MergeIntoModelOptions
{
    /// <summary>dtype of the written floating-point tensors; null keeps each tensor's dtype.</summary>
    public ScalarType? SaveDType { get; init; }
    /// <summary>Adapter keys that match no module are reported instead of failing.</summary>
    public bool Lenient { get; init; }
    /// <summary>Where the per-module math runs (default CPU).</summary>
    public Device? Device { get; init; }
}

/// <summary>What a merge into a model did.</summary>
public sealed class MergeIntoModelReport
{
    public required string Output { get; init; }
    /// <summary>One coverage report per LoRA, in input order.</summary>
    public required IReadOnlyList<CoverageReport> Coverage { get; init; }
    /// <summary>Stored tensors that changed (a fused q/k/v tensor counts once).</summary>
    public required int TensorsChanged { get; init; }
    /// <summary>Stored tensors written unchanged.</summary>
    public required int TensorsCopied { get; init; }
    public required int ModulesChanged { get; init; }
}

/// <summary>
/// Merges LoRA-family adapters into a base model, tensor by tensor: <c>W ← W + Σ ratio·ΔW</c> (DoRA: each adapter's change
/// against the original W), summed in float32 and cast to the output dtype once. Every tensor is read from the
/// memory-mapped input and written before the next is produced, so memory stays at a few tensors plus the adapters.
/// SD single files (ldm/SGM) are written as one safetensors file, diffusers and HF folders as the same folder layout
/// (same shards, other files copied).
/// </summary>
public static class LoraMerger
{
    public static MergeIntoModelReport MergeIntoModel(string modelPath, IReadOnlyList<LoraInput> loras, string output, MergeIntoModelOptions? options = null)
    {
        options ??= new MergeIntoModelOptions();
        if (loras.Count == 0) throw new LoraSharpException("no LoRA to merge (give at least one --lora FILE[:RATIO])", modelPath);
        using var model = ModelCheckpoint.Open(modelPath);
        if (model.Kind is ModelKind.SdSingleFile or ModelKind.TensorFile && !output.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
            throw new LoraSharpException("the merged single-file model is written as .safetensors; give an output path ending in .safetensors", output);
        if (Path.GetFullPath(output) == Path.GetFullPath(modelPath))
            throw new LoraSharpException("the output would overwrite the input model", output);

        var loaded = new List<AdapterLoadResult>();
        try
        {
            foreach (var lora in loras)
                loaded.Add(AdapterFile.Read(lora.Path, model.Index, new AdapterReadOptions { Lenient = options.Lenient }));

            // file → key → modules stored in that tensor → (module weights, ratio) of every adapter on the module.
            var plan = new Dictionary<(int File, string Key), List<(WeightLocation Loc, List<(ModuleAdapterWeights W, double Ratio)> Adapters)>>();
            int modulesChanged = 0;
            var byModule = new Dictionary<string, List<(ModuleAdapterWeights, double)>>(StringComparer.Ordinal);
            for (int i = 0; i < loaded.Count; i++)
                foreach (var m in loaded[i].Weights.Modules)
                {
                    if (!byModule.TryGetValue(m.ModulePath, out var list)) byModule[m.ModulePath] = list = [];
                    list.Add((m, loras[i].Ratio));
                }
            foreach (var (path, adapters) in byModule)
            {
                var loc = model.Weights[path];
                if (!plan.TryGetValue((loc.File, loc.Key), out var group)) plan[(loc.File, loc.Key)] = group = [];
                group.Add((loc, adapters));
                modulesChanged++;
            }

            int changed = 0, copied = 0;
            var mergedFrom = MergedFrom(modelPath, loras, loaded);
            for (int f = 0; f < model.Files.Count; f++)
            {
                var file = model.Files[f];
                var source = file.Source;
                var target = file.RelativePath.Length == 0 ? output : Path.Combine(output, file.RelativePath);
                Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(target))!);
                var pending = new List<PendingTensor>();
                foreach (var key in source.Keys)
                {
                    var info = source.Info(key);
                    var stored = SafetensorsDType.LoadedType(info.DType);
                    var outType = options.SaveDType is { } sd && IsFloat(stored) ? sd : stored;
                    if (plan.TryGetValue((f, key), out var group))
                    {
                        changed++;
                        int fi = f;
                        pending.Add(new PendingTensor(key, outType, info.Shape, () => Merged(model.Files[fi].Source, key, group, outType, options.Device)));
                    }
                    else
                    {
                        copied++;
                        pending.Add(new PendingTensor(key, outType, info.Shape, () =>
                        {
                            var t = source.Load(key);
                            return t.dtype == outType ? t : t.to_type(outType);
                        }));
                    }
                }
                var metadata = source.FilePath.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)
                    ? source.Metadata.ToDictionary(p => p.Key, p => p.Value, StringComparer.Ordinal)
                    : new Dictionary<string, string>(StringComparer.Ordinal);
                foreach (var (k, v) in mergedFrom) metadata[k] = v;
                SafetensorsWriter.Write(target, pending, metadata);
            }
            foreach (var other in model.OtherFiles)
            {
                var to = Path.Combine(output, other);
                Directory.CreateDirectory(Path.GetDirectoryName(to)!);
                File.Copy(Path.Combine(model.Path, other), to, overwrite: true);
            }
            return new MergeIntoModelReport
            {
                Output = output,
                Coverage = loaded.Select(l => l.Coverage).ToList(),
                TensorsChanged = changed,
                TensorsCopied = copied,
                ModulesChanged = modulesChanged,
            };
        }
        finally
        {
            foreach (var l in loaded) l.Dispose();
        }
    }

    static bool IsFloat(ScalarType t) => t is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64;

    /// <summary>The merged stored tensor: every module stored in it gets W₀ + Σ ratio·ΔW (float32), then one cast.</summary>
    static Tensor Merged(ITensorSource source, string key, List<(WeightLocation Loc, List<(ModuleAdapterWeights W, double Ratio)> Adapters)> group,
        ScalarType outType, Device? device)
    {
        using var noGrad = no_grad();
        var stored = source.Load(key, ScalarType.Float32, device);
        var result = stored.clone();
        foreach (var (loc, adapters) in group)
        {
            using var scope = NewDisposeScope();
            var w0 = ModelCheckpoint.FromStored(stored, loc);
            var delta = ModuleDelta(w0, loc.ModuleShape, adapters, device);
            if (loc.Transform == TensorTransform.FusedQkvChunk)
            {
                long rows = stored.shape[0] / 3;
                result.narrow(0, loc.Chunk * rows, rows).add_(delta.reshape(result.narrow(0, loc.Chunk * rows, rows).shape));
            }
            else if (loc.Transform == TensorTransform.Transpose)
                result.add_(delta.t());
            else
                result.add_(delta.reshape(result.shape));
        }
        return result.to_type(outType); // the writer moves it to host memory
    }

    /// <summary>Σ over adapters of the change each makes to <paramref name="w0"/> (float32, module-shaped).</summary>
    public static Tensor ModuleDelta(Tensor w0, long[] moduleShape, IEnumerable<(ModuleAdapterWeights W, double Ratio)> adapters, Device? device)
    {
        using var scope = NewDisposeScope();
        var geometry = Geometry(moduleShape);
        var sum = zeros(moduleShape, dtype: ScalarType.Float32, device: w0.device);
        foreach (var (w, ratio) in adapters)
        {
            using var adapter = AdapterFactory.FromWeights(w, geometry, ScalarType.Float32, device ?? w0.device);
            var d = adapter.EffectiveDelta(w0, ratio);
            sum.add_(w.FanInFanOut ? d.t() : d);
        }
        return sum.MoveToOuterDisposeScope();
    }

    /// <summary>The geometry of a Linear ([out, in]) or Conv2d ([out, in, kh, kw]) weight; stride and padding do not change ΔW.</summary>
    public static LayerGeometry Geometry(long[] weightShape) => weightShape.Length switch
    {
        2 => LayerGeometry.Linear(weightShape[1], weightShape[0]),
        4 => LayerGeometry.Conv2d(weightShape[1], weightShape[0], [weightShape[2], weightShape[3]]),
        _ => throw new ArgumentException($"Only Linear and Conv2d weights can carry adapters, got shape [{string.Join(", ", weightShape)}]."),
    };

    static Dictionary<string, string> MergedFrom(string model, IReadOnlyList<LoraInput> loras, List<AdapterLoadResult> loaded)
    {
        var items = loras.Select((l, i) => new Dictionary<string, object?>
        {
            ["file"] = Path.GetFileName(l.Path.TrimEnd('/', '\\')),
            ["ratio"] = l.Ratio,
            ["modules"] = loaded[i].Weights.Modules.Count,
            ["sshs_model_hash"] = loaded[i].Weights.Metadata.GetValueOrDefault("sshs_model_hash"),
        }).ToList();
        return new Dictionary<string, string>(StringComparer.Ordinal)
        {
            // sai model spec: a comma-separated list of what was merged (kohya's build_merged_from).
            ["modelspec.merged_from"] = string.Join(", ", new[] { Path.GetFileNameWithoutExtension(model.TrimEnd('/', '\\')) }
                .Concat(loras.Select(l => $"{Path.GetFileNameWithoutExtension(l.Path.TrimEnd('/', '\\'))}:{l.Ratio.ToString(CultureInfo.InvariantCulture)}"))),
            ["lorasharp.merged_loras"] = JsonSerializer.Serialize(items),
        };
    }
}
