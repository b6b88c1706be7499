using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

/// <summary>What kind of model a path holds.</summary>
public enum ModelKind
{
    /// <summary>One Stable Diffusion file in the ldm / SGM layout (.safetensors or .ckpt).</summary>
    SdSingleFile,
    /// <summary>A diffusers folder (unet/, text_encoder/, text_encoder_2/, vae/, …).</summary>
    SdDiffusers,
    /// <summary>A Hugging Face model folder (config.json + *.safetensors shards).</summary>
    HfFolder,
    /// <summary>A single tensor file whose keys are module paths + ".weight" (e.g. an LLM's model.safetensors).</summary>
    TensorFile,
}

/// <summary>One tensor file of a model, by its path relative to the model root ("" for a single file).</summary>
public sealed record ModelFile(string RelativePath, ITensorSource Source);

/// <summary>
/// Where a module's weight lives: file <paramref name="File"/> (index into <see cref="ModelCheckpoint.Files"/>), key
/// <paramref name="Key"/>, and the transform between the stored tensor and the module's weight (SD single files store
/// OpenCLIP q/k/v as row blocks of one fused tensor, SD1 proj_in/out as 1×1 convs).
/// </summary>
public sealed record WeightLocation(int File, string Key, TensorTransform Transform, int Chunk, long[] ModuleShape);

/// <summary>
/// A base model opened for the LoRA tools, without loading weights: the adaptable modules (<see cref="Index"/>, paths as
/// adapters name them: <c>unet.…</c>, <c>text_encoder.…</c>, or HF names), where each module's weight is stored, and the
/// files to reproduce when writing a merged copy. Tensors are read one at a time from the memory-mapped files.
/// </summary>
public sealed class ModelCheckpoint : IDisposable
{
    static readonly Device Meta = new(DeviceType.META);

    public required string Path { get; init; }
    public required ModelKind Kind { get; init; }
    public StableDiffusionFamily Family { get; init; } = StableDiffusionFamily.Unknown;
    public required ModuleIndex Index { get; init; }
    public required IReadOnlyList<ModelFile> Files { get; init; }
    /// <summary>Files of a folder that hold no adaptable weights (configs, tokenizer, VAE weights…), copied verbatim.</summary>
    public IReadOnlyList<string> OtherFiles { get; init; } = [];
    public required IReadOnlyDictionary<string, WeightLocation> Weights { get; init; }
    /// <summary>kohya name of a module when it is not the mangled path (SDXL UNet: the SGM path); null = mangled path.</summary>
    public Func<string, string?>? KohyaNameOf { get; init; }

    public bool IsStableDiffusion => Kind is ModelKind.SdSingleFile or ModelKind.SdDiffusers;

    /// <summary>Opens a single SD file, a diffusers folder, an HF folder or a tensor file of module weights.</summary>
    public static ModelCheckpoint Open(string path)
    {
        if (Directory.Exists(path))
        {
            if (File.Exists(System.IO.Path.Combine(path, "model_index.json")) || Directory.Exists(System.IO.Path.Combine(path, "unet")))
                return OpenDiffusers(path);
            return OpenHfFolder(path);
        }
        if (!File.Exists(path)) throw new LoraSharpException("no such file or folder", path);
        var source = StableDiffusionCheckpoint.Open(path);
        try
        {
            if (StableDiffusionCheckpoint.DetectFamily(source) != StableDiffusionFamily.Unknown)
                return OpenSdSingleFile(path, source);
            return Direct(path, ModelKind.TensorFile, [new ModelFile("", source)], []);
        }
        catch
        {
            source.Dispose();
            throw;
        }
    }

    static ModelCheckpoint OpenSdSingleFile(string path, ITensorSource source)
    {
        var config = StableDiffusionCheckpoint.DeriveConfig(source);
        // Built on the meta device: no memory, only the module tree and its single-file key map.
        using var model = new StableDiffusionModel(config, Meta, ScalarType.Float32, withVae: false);
        var map = StableDiffusionCheckpoint.SingleFileKeyMap(model);
        var shapes = new List<KeyValuePair<string, long[]>>();
        var weights = new Dictionary<string, WeightLocation>(StringComparer.Ordinal);
        var aliases = new List<KeyValuePair<string, string>>();
        var ldmNames = new Dictionary<string, string>(StringComparer.Ordinal);
        bool sgm = config.Family is StableDiffusionFamily.SDXLBase or StableDiffusionFamily.SDXLRefiner;
        foreach (var (component, module) in new (string, nn.Module?)[] { ("unet.", model.Unet), ("text_encoder.", model.TextEncoder), ("text_encoder_2.", model.TextEncoder2) })
        {
            if (module is null) continue;
            foreach (var (modulePath, shape) in ModuleIndex.AdaptableModules(module, component))
            {
                if (!map.TryGetValue(modulePath + ".weight", out var m) || !source.Contains(m.Source)) continue;
                shapes.Add(new(modulePath, shape));
                weights[modulePath] = new WeightLocation(0, m.Source, m.Transform, m.Chunk, shape);
                if (component == "unet.")
                {
                    // The ldm/SGM module path is another name of the same module (kohya SDXL files use it).
                    var ldm = "unet." + m.Source[StableDiffusionCheckpoint.UNetRoot.Length..^".weight".Length];
                    if (ldm != modulePath) aliases.Add(new(ldm, modulePath));
                    ldmNames[modulePath] = "lora_unet_" + ldm["unet.".Length..].Replace('.', '_');
                }
            }
        }
        return new ModelCheckpoint
        {
            Path = path,
            Kind = ModelKind.SdSingleFile,
            Family = config.Family,
            Index = ModuleIndex.FromShapes(shapes, aliases),
            Files = [new ModelFile("", source)],
            Weights = weights,
            KohyaNameOf = sgm ? p => ldmNames.GetValueOrDefault(p) : null,
        };
    }

    static ModelCheckpoint OpenDiffusers(string folder)
    {
        var config = StableDiffusionConfig.FromDiffusersFolder(folder);
        var files = new List<ModelFile>();
        var used = new HashSet<string>(StringComparer.Ordinal);
        var shapes = new List<KeyValuePair<string, long[]>>();
        var weights = new Dictionary<string, WeightLocation>(StringComparer.Ordinal);
        try
        {
            foreach (var (sub, prefix) in BaseModelIndex.DiffusersComponents)
            {
                var dir = System.IO.Path.Combine(folder, sub);
                if (!Directory.Exists(dir)) continue;
                var file = ComponentWeights(dir);
                if (!file.EndsWith(".safetensors", StringComparison.Ordinal))
                    throw new LoraSharpException("the LoRA tools write diffusers folders as safetensors; convert this component first", file);
                var source = TensorFiles.Open(file);
                int index = files.Count;
                var relative = System.IO.Path.GetRelativePath(folder, file);
                files.Add(new ModelFile(relative, source));
                used.Add(relative);
                foreach (var key in source.Keys)
                {
                    var info = source.Info(key);
                    if (!key.EndsWith(".weight", StringComparison.Ordinal) || info.Shape.Length is not (2 or 4)) continue;
                    var modulePath = prefix + key[..^".weight".Length];
                    shapes.Add(new(modulePath, info.Shape));
                    weights[modulePath] = new WeightLocation(index, key, TensorTransform.None, 0, info.Shape);
                }
            }
            if (files.Count == 0) throw new LoraSharpException("no unet/ or text_encoder/ component folder", folder);
            return new ModelCheckpoint
            {
                Path = folder,
                Kind = ModelKind.SdDiffusers,
                Family = config.Family,
                Index = ModuleIndex.FromShapes(shapes),
                Files = files,
                OtherFiles = OtherFilesOf(folder, used),
                Weights = weights,
            };
        }
        catch
        {
            foreach (var f in files) f.Source.Dispose();
            throw;
        }
    }

    static string ComponentWeights(string dir)
    {
        string[] names = ["diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "pytorch_model.bin"];
        foreach (var n in names)
        {
            var p = System.IO.Path.Combine(dir, n);
            if (File.Exists(p)) return p;
        }
        throw new LoraSharpException($"no weights file found (looked for {string.Join(", ", names)})", dir);
    }

    static ModelCheckpoint OpenHfFolder(string folder)
    {
        var shards = Directory.GetFiles(folder, "*.safetensors").Order(StringComparer.Ordinal).ToList();
        if (shards.Count == 0)
        {
            if (Directory.GetFiles(folder, "*.bin").Length > 0)
                throw new LoraSharpException("the LoRA tools read and write safetensors shards; this folder has only .bin weights", folder);
            throw new LoraSharpException("no *.safetensors weights in this folder", folder);
        }
        var files = new List<ModelFile>();
        try
        {
            foreach (var s in shards) files.Add(new ModelFile(System.IO.Path.GetFileName(s), TensorFiles.Open(s)));
            var used = files.Select(f => f.RelativePath).ToHashSet(StringComparer.Ordinal);
            return Direct(folder, ModelKind.HfFolder, files, OtherFilesOf(folder, used));
        }
        catch
        {
            foreach (var f in files) f.Source.Dispose();
            throw;
        }
    }

    /// <summary>Modules named by their keys: every 2-D / 4-D "*.weight" except embeddings and lm_head.</summary>
    static ModelCheckpoint Direct(string path, ModelKind kind, List<ModelFile> files, IReadOnlyList<string> others)
    {
        var shapes = new List<KeyValuePair<string, long[]>>();
        var weights = new Dictionary<string, WeightLocation>(StringComparer.Ordinal);
        for (int i = 0; i < files.Count; i++)
        {
            var source = files[i].Source;
            foreach (var key in source.Keys)
            {
                var info = source.Info(key);
                if (!key.EndsWith(".weight", StringComparison.Ordinal) || info.Shape.Length is not (2 or 4)) continue;
                var modulePath = key[..^".weight".Length];
                if (weights.ContainsKey(modulePath))
                    throw new LoraSharpException("the key is in two shards", source.FilePath, key);
                shapes.Add(new(modulePath, info.Shape));
                weights[modulePath] = new WeightLocation(i, key, TensorTransform.None, 0, info.Shape);
            }
        }
        return new ModelCheckpoint { Path = path, Kind = kind, Index = ModuleIndex.FromShapes(shapes), Files = files, OtherFiles = others, Weights = weights };
    }

    static IReadOnlyList<string> OtherFilesOf(string folder, HashSet<string> used) =>
        Directory.GetFiles(folder, "*", SearchOption.AllDirectories)
            .Select(f => System.IO.Path.GetRelativePath(folder, f))
            .Where(r => !used.Contains(r) && !System.IO.Path.GetFileName(r).StartsWith('.'))
            .Order(StringComparer.Ordinal)
            .ToList();

    /// <summary>
    /// Modules a LoRA network would target (kohya's LoRANetwork / PEFT all-linear): SD UNet Linear and 1×1 convs in
    /// transformer blocks (with <paramref name="withConv"/> also every Linear/Conv of resnets, down- and upsamplers), SD
    /// text encoder attention and MLP projections; LLMs every Linear except embeddings and lm_head.
    /// </summary>
    public IReadOnlyList<string> LoraTargets(bool withConv)
    {
        var list = new List<string>();
        foreach (var path in Index.Paths)
        {
            var shape = Index.WeightShape(path);
            bool pointwise = shape.Length == 2 || (shape.Length == 4 && shape[2] == 1 && shape[3] == 1);
            if (IsStableDiffusion)
            {
                if (path.StartsWith("unet.", StringComparison.Ordinal))
                {
                    bool transformer = path.Contains(".attentions.", StringComparison.Ordinal);
                    bool convBlock = path.Contains(".resnets.", StringComparison.Ordinal) || path.Contains(".downsamplers.", StringComparison.Ordinal)
                        || path.Contains(".upsamplers.", StringComparison.Ordinal);
                    if ((transformer && pointwise) || (withConv && convBlock)) list.Add(path);
                }
                else if (path.StartsWith("text_encoder", StringComparison.Ordinal))
                {
                    if (path.Contains(".self_attn.", StringComparison.Ordinal) || path.Contains(".mlp.", StringComparison.Ordinal)) list.Add(path);
                }
            }
            else
            {
                var last = path[(path.LastIndexOf('.') + 1)..];
                if (shape.Length == 2 && last != "lm_head" && !last.Contains("embed", StringComparison.Ordinal) && !path.Contains("embed_tokens", StringComparison.Ordinal))
                    list.Add(path);
            }
        }
        return list;
    }

    /// <summary>A module's weight, shaped as the module's weight, in <paramref name="dtype"/>.</summary>
    public Tensor LoadWeight(string modulePath, ScalarType dtype, Device? device = null)
    {
        if (!Weights.TryGetValue(modulePath, out var loc))
            throw new LoraSharpException($"the model has no module '{modulePath}'", Path, modulePath);
        using var scope = NewDisposeScope();
        var stored = Files[loc.File].Source.Load(loc.Key, dtype, device);
        return FromStored(stored, loc).MoveToOuterDisposeScope();
    }

    /// <summary>The module's view of a stored tensor (row block of a fused tensor, reshape of a 1×1 conv).</summary>
    public static Tensor FromStored(Tensor stored, WeightLocation loc) => loc.Transform switch
    {
        TensorTransform.FusedQkvChunk => stored.chunk(3, 0)[loc.Chunk].reshape(loc.ModuleShape),
        TensorTransform.Transpose => stored.t().contiguous(),
        _ => stored.reshape(loc.ModuleShape),
    };

    public void Dispose()
    {
        foreach (var f in Files) f.Source.Dispose();
    }
}
