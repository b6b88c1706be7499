using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Adapters;

/// <summary>
/// A deliberately small, test-only reader of the reference adapter files into the contract (the real readers are
/// the Formats area's). Module trees are built from the base model's own weight keys.
/// </summary>
static class ReferenceTranslator
{
    static readonly string[] Suffixes =
    [
        "lora_down.weight", "lora_up.weight", "lora_mid.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "dora_scale", "alpha",
    ];

    static AdapterAlgorithm AlgorithmOf(IEnumerable<string> names, string where)
    {
        var set = names.ToHashSet();
        if (set.Contains("lora_down")) return AdapterAlgorithm.LoRA;
        if (set.Contains("hada_w1_a")) return AdapterAlgorithm.LoHa;
        if (set.Any(n => n.StartsWith("lokr_"))) return AdapterAlgorithm.LoKr;
        if (set.Contains("diff")) return AdapterAlgorithm.Full;
        throw new InvalidDataException($"{where}: cannot tell the algorithm from {string.Join(", ", set)}");
    }

    /// <summary>A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) as contract weights.</summary>
    public static AdapterWeights ReadPeft(string dir, string name)
    {
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
        string type = cfg["peft_type"]!.GetValue<string>();
        int r = cfg["r"]!.GetValue<int>();
        double alpha = (cfg["lora_alpha"] ?? cfg["alpha"])!.GetValue<double>();
        bool rs = cfg["use_rslora"]?.GetValue<bool>() ?? false;
        using var f = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        const string prefix = "base_model.model.";
        var byModule = new Dictionary<string, Dictionary<string, Tensor>>();
        foreach (var key in f.Keys)
        {
            if (!key.StartsWith(prefix)) throw new InvalidDataException($"{f.FilePath}: unexpected key {key}");
            var rest = key[prefix.Length..];
            string module, tensor;
            (module, tensor) = rest switch
            {
                _ when rest.EndsWith(".lora_A.weight") => (rest[..^".lora_A.weight".Length], "lora_down"),
                _ when rest.EndsWith(".lora_B.weight") => (rest[..^".lora_B.weight".Length], "lora_up"),
                _ when rest.EndsWith(".lora_magnitude_vector") => (rest[..^".lora_magnitude_vector".Length], "magnitude"),
                _ => (rest[..rest.LastIndexOf('.')], rest[(rest.LastIndexOf('.') + 1)..]),
            };
            if (!byModule.TryGetValue(module, out var d)) byModule[module] = d = [];
            d[tensor] = f.Load(key);
        }
        var algo = type switch { "LORA" => AdapterAlgorithm.LoRA, "LOHA" => AdapterAlgorithm.LoHa, "LOKR" => AdapterAlgorithm.LoKr, _ => throw new InvalidDataException(type) };
        return new AdapterWeights
        {
            Name = name,
            Modules = byModule.Select(kv => new ModuleAdapterWeights
            {
                ModulePath = kv.Key, Algorithm = algo, Tensors = kv.Value, Alpha = alpha, RsLora = rs, Convention = ScaleConvention.Peft, Rank = r,
            }).ToList(),
        };
    }

    /// <summary>kohya/LyCORIS keys (lora_unet_… / lora_te_…) mapped through the base models' module lists.</summary>
    public static AdapterWeights ReadKohya(string file, string name, IEnumerable<string> unetModules, IEnumerable<string> teModules)
    {
        var map = new Dictionary<string, string>();
        foreach (var m in unetModules) map["lora_unet_" + m.Replace('.', '_')] = "unet." + m;
        foreach (var m in teModules) map["lora_te_" + m.Replace('.', '_')] = "text_encoder." + m;
        using var f = SafetensorsFile.Open(file);
        var byModule = new Dictionary<string, Dictionary<string, Tensor>>();
        var alphas = new Dictionary<string, double>();
        foreach (var key in f.Keys)
        {
            int dot = key.IndexOf('.');
            var (lora, suffix) = (key[..dot], key[(dot + 1)..]);
            if (!Suffixes.Contains(suffix)) throw new InvalidDataException($"{file}: unknown suffix in {key}");
            if (!map.TryGetValue(lora, out var path)) throw new InvalidDataException($"{file}: no module for {lora}");
            if (suffix == "alpha") { alphas[path] = f.Load(key, float64).item<double>(); continue; }
            if (!byModule.TryGetValue(path, out var d)) byModule[path] = d = [];
            d[suffix.Replace(".weight", "")] = f.Load(key);
        }
        return new AdapterWeights
        {
            Name = name,
            Modules = byModule.Select(kv => new ModuleAdapterWeights
            {
                ModulePath = kv.Key, Algorithm = AlgorithmOf(kv.Value.Keys, kv.Key), Tensors = kv.Value,
                Alpha = alphas.TryGetValue(kv.Key, out var a) ? a : null, Convention = ScaleConvention.LyCORIS,
            }).ToList(),
        };
    }

    /// <summary>diffusers keys (unet.X.lora_A.weight or unet.X.lora.down.weight), scale from lora_adapter_metadata.</summary>
    public static AdapterWeights ReadDiffusers(string file, string name)
    {
        using var f = SafetensorsFile.Open(file);
        var meta = JsonNode.Parse(f.Metadata["lora_adapter_metadata"])!;
        double alpha = meta["unet.lora_alpha"]!.GetValue<double>();
        int r = meta["unet.r"]!.GetValue<int>();
        var byModule = new Dictionary<string, Dictionary<string, Tensor>>();
        foreach (var key in f.Keys)
        {
            string rest = key.StartsWith("unet.") ? key : throw new InvalidDataException($"{file}: unexpected key {key}");
            (string module, string tensor) = rest switch
            {
                _ when rest.EndsWith(".lora_A.weight") => (rest[..^".lora_A.weight".Length], "lora_down"),
                _ when rest.EndsWith(".lora_B.weight") => (rest[..^".lora_B.weight".Length], "lora_up"),
                _ when rest.EndsWith(".lora.down.weight") => (rest[..^".lora.down.weight".Length], "lora_down"),
                _ when rest.EndsWith(".lora.up.weight") => (rest[..^".lora.up.weight".Length], "lora_up"),
                _ => throw new InvalidDataException($"{file}: unexpected key {key}"),
            };
            if (!byModule.TryGetValue(module, out var d)) byModule[module] = d = [];
            d[tensor] = f.Load(key);
        }
        return new AdapterWeights
        {
            Name = name,
            Modules = byModule.Select(kv => new ModuleAdapterWeights
            {
                ModulePath = kv.Key, Algorithm = AdapterAlgorithm.LoRA, Tensors = kv.Value, Alpha = alpha, Rank = r, Convention = ScaleConvention.Peft,
            }).ToList(),
        };
    }

    /// <summary>
    /// A module tree with a Linear for every 2-D and a Conv2d for every 4-D weight in the file (key minus ".weight"),
    /// weights loaded. Conv stride/padding are not in the file; they do not enter ΔW.
    /// </summary>
    public static Node TreeFromWeights(string file, Func<string, bool>? include = null)
    {
        using var f = SafetensorsFile.Open(file);
        var leaves = new List<(string, nn.Module)>();
        foreach (var key in f.Keys)
        {
            if (!key.EndsWith(".weight")) continue;
            var path = key[..^".weight".Length];
            if (include is not null && !include(path)) continue;
            var info = f.Info(key);
            bool hasBias = f.Contains(path + ".bias");
            nn.Module leaf;
            if (info.Shape.Length == 2)
            {
                var lin = nn.Linear(info.Shape[1], info.Shape[0], hasBias);
                using (no_grad())
                {
                    lin.weight!.copy_(f.Load(key, float32));
                    if (hasBias) lin.bias!.copy_(f.Load(path + ".bias", float32));
                }
                leaf = lin;
            }
            else if (info.Shape.Length == 4)
            {
                var conv = nn.Conv2d(info.Shape[1], info.Shape[0], (info.Shape[2], info.Shape[3]), padding: (info.Shape[2] / 2, info.Shape[3] / 2), bias: hasBias);
                using (no_grad())
                {
                    conv.weight!.copy_(f.Load(key, float32));
                    if (hasBias) conv.bias!.copy_(f.Load(path + ".bias", float32));
                }
                leaf = conv;
            }
            else continue;
            leaves.Add((path, leaf));
        }
        return TestTrees.Build(leaves);
    }
}
