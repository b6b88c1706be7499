using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Formats;

/// <summary>Options for reading an adapter file.</summary>
public sealed class AdapterReadOptions
{
    /// <summary>Unmatched keys become a report instead of an error.</summary>
    public bool Lenient { get; init; }

    /// <summary>The dtype adapter tensors are loaded as (math is done in float32 by default).</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;

    public Device? Device { get; init; }

    /// <summary>Adapter name; default: the file stem (or folder name for PEFT folders).</summary>
    public string? Name { get; init; }
}

/// <summary>An adapter read from a file, with what matched and what the file says of itself.</summary>
public sealed class AdapterLoadResult : IDisposable
{
    public required AdapterWeights Weights { get; init; }
    public required CoverageReport Coverage { get; init; }
    public required IReadOnlySet<KeyFormat> KeyFormats { get; init; }
    public required BaseModelGuess Base { get; init; }
    public PeftAdapterConfig? PeftConfig { get; init; }

    public void Dispose() => Weights.Dispose();
}

/// <summary>
/// Reads adapter files of every common layout — kohya/A1111 and LyCORIS (<c>lora_unet_…</c>), diffusers (PEFT
/// backend, old <c>lora.down</c>, attention processors; mixed files key by key), PEFT folders for LLMs — into
/// <see cref="AdapterWeights"/> on the module paths of a target model.
/// </summary>
public static class AdapterFile
{
    public const string PeftConfigName = "adapter_config.json";
    static readonly string[] PeftWeightNames = ["adapter_model.safetensors", "adapter_model.bin"];

    /// <summary>The tensor file and (for PEFT) config file behind a path: a file, or a PEFT adapter folder.</summary>
    public static (string TensorFile, string? ConfigFile) Locate(string path)
    {
        if (Directory.Exists(path))
        {
            var config = Path.Combine(path, PeftConfigName);
            var weights = PeftWeightNames.Select(n => Path.Combine(path, n)).FirstOrDefault(File.Exists);
            if (weights is null)
                throw new LoraSharpException($"a PEFT adapter folder needs {string.Join(" or ", PeftWeightNames)}", path);
            return (weights, File.Exists(config) ? config : null);
        }
        if (!File.Exists(path)) throw new LoraSharpException($"no such file or folder", path);
        var sibling = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path))!, PeftConfigName);
        bool isPeftWeights = PeftWeightNames.Contains(Path.GetFileName(path));
        return (path, isPeftWeights && File.Exists(sibling) ? sibling : null);
    }

    /// <summary>
    /// Reads an adapter. With a target index, every key must resolve to one of its modules (else an error
    /// listing the unmatched keys, or a report with <see cref="AdapterReadOptions.Lenient"/>), and shapes are
    /// checked against the modules' weights. Without one, modules keep the file's own names.
    /// </summary>
    public static AdapterLoadResult Read(string path, ModuleIndex? target = null, AdapterReadOptions? options = null)
    {
        options ??= new AdapterReadOptions();
        var (tensorFile, configFile) = Locate(path);
        var config = configFile is null ? null : PeftAdapterConfig.Read(configFile);
        using var source = TensorFiles.Open(tensorFile);
        var name = options.Name ?? (Directory.Exists(path) ? new DirectoryInfo(path).Name : Path.GetFileNameWithoutExtension(path));
        return Read(source, name, config, target, options);
    }

    /// <summary>Reads an adapter from an open tensor source (see <see cref="Read(string, ModuleIndex?, AdapterReadOptions?)"/>).</summary>
    public static AdapterLoadResult Read(ITensorSource source, string name, PeftAdapterConfig? config, ModuleIndex? target,
        AdapterReadOptions options)
    {
        var file = source.FilePath;
        var unmatched = new List<string>();
        var groups = new Dictionary<string, List<AdapterKey>>(StringComparer.Ordinal);
        var formats = new HashSet<KeyFormat>();
        foreach (var key in source.Keys)
        {
            var parsed = AdapterKeyParser.Parse(key);
            if (parsed is null) { unmatched.Add(key); continue; }
            formats.Add(parsed.Format);
            string? modulePath = target is null ? parsed.GroupName : target.Resolve(parsed);
            if (modulePath is null) { unmatched.Add(key); continue; }
            if (!groups.TryGetValue(modulePath, out var list)) groups[modulePath] = list = [];
            list.Add(parsed);
        }

        var guess = BaseModelDetector.DetectAdapter(source.Metadata, source.Keys.Select(k => (k, source.Info(k).Shape)));
        var coverage = new CoverageReport
        {
            FilePath = file,
            TotalKeys = source.Keys.Count,
            MatchedKeys = source.Keys.Count - unmatched.Count,
            TargetedModules = groups.Keys.OrderBy(p => p, StringComparer.Ordinal).ToList(),
            UnmatchedKeys = CoverageReport.Group(unmatched),
            UntouchedModules = target is null ? [] : CoverageReport.Group(target.Paths.Where(p => !groups.ContainsKey(p))),
        };
        if (unmatched.Count > 0 && !options.Lenient)
        {
            var hint = target is null ? "" : WrongBaseHint(guess, target);
            throw new LoraSharpException(
                $"{unmatched.Count} of {source.Keys.Count} keys match no module{hint}\n{coverage.ToText()}" +
                "Use --lenient to load the rest and report these keys.", file, unmatched[0]);
        }

        var diffusersAlphas = DiffusersAlphas(source.Metadata, file);
        var modules = new List<ModuleAdapterWeights>();
        try
        {
            foreach (var (modulePath, keys) in groups.OrderBy(g => g.Key, StringComparer.Ordinal))
            {
                var module = BuildModule(source, modulePath, keys, config, diffusersAlphas, options);
                modules.Add(module);
                if (target is not null) CheckShapes(file, module, keys, target.WeightShape(modulePath), guess, target);
            }
        }
        catch
        {
            foreach (var m in modules) m.Dispose();
            throw;
        }

        var metadata = source.Metadata.ToDictionary(p => p.Key, p => p.Value, StringComparer.Ordinal);
        return new AdapterLoadResult
        {
            Weights = new AdapterWeights { Name = name, Modules = modules, Metadata = metadata },
            Coverage = coverage,
            KeyFormats = formats,
            Base = guess,
            PeftConfig = config,
        };
    }

    static string WrongBaseHint(BaseModelGuess adapter, ModuleIndex target)
    {
        var model = BaseModelDetector.DetectModel(target);
        if (adapter.Family == BaseFamily.Unknown || model.Family == BaseFamily.Unknown) return "";
        return adapter.Family == model.Family ? "" : $" — this adapter was made for {adapter.Description}, the model is {model.Description}";
    }

    static ModuleAdapterWeights BuildModule(ITensorSource source, string modulePath, List<AdapterKey> keys,
        PeftAdapterConfig? config, DiffusersAlphaInfo? diffusersAlphas, AdapterReadOptions options)
    {
        var file = source.FilePath;
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        double? alpha = null;
        try
        {
            foreach (var key in keys)
            {
                if (tensors.ContainsKey(key.Role) || (key.Role == "alpha" && alpha is not null))
                    throw new LoraSharpException($"module '{modulePath}' has two '{key.Role}' tensors (the file mixes two layouts for one module)", file, key.FileKey);
                if (key.Role == "alpha")
                {
                    var info = source.Info(key.FileKey);
                    if (info.Shape.Aggregate(1L, (a, b) => a * b) != 1)
                        throw new LoraSharpException($"alpha must be a scalar, got shape [{string.Join(", ", info.Shape)}]", file, key.FileKey);
                    using var a = source.Load(key.FileKey, ScalarType.Float64);
                    alpha = a.item<double>();
                    continue;
                }
                tensors[key.Role] = source.Load(key.FileKey, options.DType, options.Device);
            }

            var algorithm = AlgorithmOf(file, modulePath, keys, tensors);
            var format = keys[0].Format;
            var convention = ScaleConvention.LyCORIS;
            bool rsLora = false, fanInFanOut = false;
            int? configRank = null;
            if (format == KeyFormat.Peft && config is not null)
            {
                convention = ScaleConvention.Peft;
                alpha = config.AlphaFor(modulePath);
                rsLora = config.UseRslora;
                fanInFanOut = config.FanInFanOut;
                int rank = RankOf(algorithm, tensors);
                int configured = config.RankFor(modulePath);
                configRank = configured;
                if (rank != configured && algorithm == AdapterAlgorithm.LoRA)
                    throw new LoraSharpException($"module '{modulePath}' has rank {rank} but adapter_config.json says r={configured}", file, keys[0].FileKey);
                if (config.UseDora && algorithm == AdapterAlgorithm.LoRA && !tensors.ContainsKey("magnitude"))
                    throw new LoraSharpException($"use_dora is set but module '{modulePath}' has no lora_magnitude_vector", file, keys[0].FileKey);
            }
            else if (format is KeyFormat.DiffusersPeft or KeyFormat.DiffusersLegacy)
            {
                convention = ScaleConvention.Peft;
                if (alpha is null && diffusersAlphas is not null) alpha = diffusersAlphas.AlphaFor(keys[0].Component, keys[0].ModuleName);
            }
            else if (format == KeyFormat.Peft && algorithm != AdapterAlgorithm.Full)
            {
                convention = ScaleConvention.Peft;
            }

            return new ModuleAdapterWeights
            {
                ModulePath = modulePath,
                Algorithm = algorithm,
                Tensors = tensors,
                Alpha = alpha,
                Rank = algorithm == AdapterAlgorithm.LoKr ? configRank : null,
                RsLora = rsLora,
                Convention = convention,
                FanInFanOut = fanInFanOut,
            };
        }
        catch
        {
            foreach (var t in tensors.Values) t.Dispose();
            throw;
        }
    }

    static AdapterAlgorithm AlgorithmOf(string file, string modulePath, List<AdapterKey> keys, Dictionary<string, Tensor> t)
    {
        string FirstKey() => keys[0].FileKey;
        bool lora = t.ContainsKey("lora_down") || t.ContainsKey("lora_up") || t.ContainsKey("lora_mid");
        bool loha = t.Keys.Any(k => k.StartsWith("hada_", StringComparison.Ordinal));
        bool lokr = t.Keys.Any(k => k.StartsWith("lokr_", StringComparison.Ordinal));
        bool full = t.ContainsKey("diff") || t.ContainsKey("diff_b");
        int kinds = (lora ? 1 : 0) + (loha ? 1 : 0) + (lokr ? 1 : 0) + (full ? 1 : 0);
        if (kinds == 0)
            throw new LoraSharpException($"module '{modulePath}' has only {string.Join(", ", keys.Select(k => k.Role))} and no weights", file, FirstKey());
        if (kinds > 1)
            throw new LoraSharpException($"module '{modulePath}' mixes algorithms ({string.Join(", ", t.Keys)})", file, FirstKey());

        void Need(string role, string why)
        {
            if (!t.ContainsKey(role))
                throw new LoraSharpException($"module '{modulePath}' ({why}) lacks '{role}' (keys: {string.Join(", ", keys.Select(k => k.FileKey))})", file, FirstKey());
        }

        if (lora)
        {
            Need("lora_down", "LoRA"); Need("lora_up", "LoRA");
            long downRank = t["lora_down"].shape[0], upRank = t["lora_up"].shape[1];
            long midIn = t.TryGetValue("lora_mid", out var mid) ? mid.shape[1] : downRank;
            long midOut = mid is null ? downRank : mid.shape[0];
            if (midIn != downRank || upRank != midOut)
                throw new LoraSharpException($"module '{modulePath}': rank mismatch — lora_down has {downRank} rows, lora_up has {upRank} columns{(mid is null ? "" : $", lora_mid is [{string.Join(",", mid.shape)}]")}", file, FirstKey());
            if (t.ContainsKey("magnitude") && t["magnitude"].dim() != 1)
                throw new LoraSharpException($"module '{modulePath}': lora_magnitude_vector must be 1-D, got [{string.Join(",", t["magnitude"].shape)}]", file, FirstKey());
            return AdapterAlgorithm.LoRA;
        }
        if (loha)
        {
            foreach (var r in new[] { "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b" }) Need(r, "LoHa");
            if (t.ContainsKey("hada_t1") != t.ContainsKey("hada_t2"))
                throw new LoraSharpException($"module '{modulePath}': LoHa Tucker form needs both hada_t1 and hada_t2", file, FirstKey());
            return AdapterAlgorithm.LoHa;
        }
        if (lokr)
        {
            if (!t.ContainsKey("lokr_w1")) { Need("lokr_w1_a", "LoKr without lokr_w1"); Need("lokr_w1_b", "LoKr without lokr_w1"); }
            if (!t.ContainsKey("lokr_w2")) { Need("lokr_w2_a", "LoKr without lokr_w2"); Need("lokr_w2_b", "LoKr without lokr_w2"); }
            return AdapterAlgorithm.LoKr;
        }
        return AdapterAlgorithm.Full;
    }

    /// <summary>The rank r used in alpha/r: LoRA down rows; LoHa w1_b rows; LoKr the decomposed factor's rank.</summary>
    public static int RankOf(AdapterAlgorithm algorithm, IReadOnlyDictionary<string, Tensor> t) => algorithm switch
    {
        AdapterAlgorithm.LoRA => (int)t["lora_down"].shape[0],
        AdapterAlgorithm.LoHa => (int)t["hada_w1_b"].shape[0],
        AdapterAlgorithm.LoKr => t.TryGetValue("lokr_w1_b", out var w1b) ? (int)w1b.shape[0]
            : t.TryGetValue("lokr_w2_b", out var w2b) ? (int)w2b.shape[0] : 0,
        _ => 0,
    };

    /// <summary>The [out, in·kh·kw] extent of ΔW the factors produce (without computing it).</summary>
    public static (long Out, long InTimesKernel) DeltaExtent(ModuleAdapterWeights m)
    {
        var t = m.Tensors;
        static long Rest(Tensor x) => x.shape.Skip(1).Aggregate(1L, (a, b) => a * b);
        switch (m.Algorithm)
        {
            case AdapterAlgorithm.LoRA:
                {
                    var down = t["lora_down"];
                    long inK = down.shape[1] * (down.dim() == 4 ? down.shape[2] * down.shape[3] : 1);
                    if (t.TryGetValue("lora_mid", out var mid) && mid.dim() == 4) inK = down.shape[1] * mid.shape[2] * mid.shape[3];
                    return (t["lora_up"].shape[0], inK);
                }
            case AdapterAlgorithm.LoHa:
                if (t.TryGetValue("hada_t1", out var t1))
                    return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1] * t1.shape[2] * t1.shape[3]);
                return (t["hada_w1_a"].shape[0], Rest(t["hada_w1_b"]));
            case AdapterAlgorithm.LoKr:
                {
                    long a, c, b, d;
                    if (t.TryGetValue("lokr_w1", out var w1)) { a = w1.shape[0]; c = Rest(w1); }
                    else { a = t["lokr_w1_a"].shape[0]; c = Rest(t["lokr_w1_b"]); }
                    if (t.TryGetValue("lokr_w2", out var w2)) { b = w2.shape[0]; d = Rest(w2); }
                    else if (t.TryGetValue("lokr_t2", out var t2)) { b = t["lokr_w2_a"].shape[1]; d = t["lokr_w2_b"].shape[1] * t2.shape[2] * t2.shape[3]; }
                    else { b = t["lokr_w2_a"].shape[0]; d = Rest(t["lokr_w2_b"]); }
                    return (a * b, c * d);
                }
            default:
                {
                    var diff = t.TryGetValue("diff", out var df) ? df : t["diff_b"];
                    return (diff.shape[0], diff.dim() == 1 ? 1 : Rest(diff));
                }
        }
    }

    static void CheckShapes(string file, ModuleAdapterWeights m, List<AdapterKey> keys, long[] weightShape, BaseModelGuess guess, ModuleIndex target)
    {
        if (m.Algorithm == AdapterAlgorithm.Full && !m.Tensors.ContainsKey("diff")) return;
        var (outDim, inK) = DeltaExtent(m);
        long wOut = weightShape[0], wInK = weightShape.Skip(1).Aggregate(1L, (a, b) => a * b);
        if (m.FanInFanOut) (wOut, wInK) = (wInK, wOut);
        if (outDim != wOut || inK != wInK)
        {
            throw new LoraSharpException(
                $"the adapter's update for '{m.ModulePath}' is {outDim}×{inK} but the module's weight is " +
                $"[{string.Join(", ", weightShape)}]{WrongBaseHint(guess, target)}", file, keys[0].FileKey);
        }
    }

    /// <summary>Alphas of diffusers files: metadata <c>lora_adapter_metadata</c> (PEFT LoraConfig per component).</summary>
    sealed class DiffusersAlphaInfo(Dictionary<string, PeftAdapterConfig> byComponent)
    {
        public double? AlphaFor(string component, string modulePath)
        {
            var key = component.Length == 0 ? "unet." : component;
            return byComponent.TryGetValue(key, out var c) ? c.AlphaFor(modulePath) : null;
        }
    }

    static DiffusersAlphaInfo? DiffusersAlphas(IReadOnlyDictionary<string, string> metadata, string file)
    {
        if (!metadata.TryGetValue("lora_adapter_metadata", out var text)) return null;
        JsonObject? json;
        try { json = JsonNode.Parse(text) as JsonObject; }
        catch (JsonException e) { throw new LoraSharpException($"metadata 'lora_adapter_metadata' is not valid JSON: {e.Message}", file, "lora_adapter_metadata"); }
        if (json is null) return null;
        var byComponent = new Dictionary<string, PeftAdapterConfig>(StringComparer.Ordinal);
        foreach (var component in AdapterKeyParser.DiffusersComponents)
        {
            var part = new JsonObject();
            foreach (var (k, v) in json)
                if (k.StartsWith(component, StringComparison.Ordinal)) part[k[component.Length..]] = v?.DeepClone();
            if (part.Count > 0) byComponent[component] = PeftAdapterConfig.FromJson(part, file + " (lora_adapter_metadata)");
        }
        // Some files store the config without component prefixes.
        if (byComponent.Count == 0 && json.ContainsKey("r")) byComponent["unet."] = PeftAdapterConfig.FromJson(json, file);
        return new DiffusersAlphaInfo(byComponent);
    }
}
