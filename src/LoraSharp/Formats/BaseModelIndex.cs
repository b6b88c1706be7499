using LoraSharp.IO;

namespace LoraSharp.Formats;

/// <summary>
/// Builds the <see cref="ModuleIndex"/> of a base model from its files, without loading weights (headers only):
/// a Hugging Face LLM folder (<c>config.json</c> + <c>*.safetensors</c> shards or <c>pytorch_model*.bin</c>), a diffusers
/// SD folder (<c>unet/</c>, <c>text_encoder/</c>, <c>text_encoder_2/</c>), or a single tensor file whose keys are
/// module paths.
/// </summary>
public static class BaseModelIndex
{
    /// <summary>diffusers component folders and the path prefix their modules get.</summary>
    public static readonly IReadOnlyList<(string Folder, string Prefix)> DiffusersComponents =
        [("unet", "unet."), ("text_encoder", "text_encoder."), ("text_encoder_2", "text_encoder_2.")];

    public static ModuleIndex FromPath(string path)
    {
        if (Directory.Exists(path))
        {
            if (File.Exists(Path.Combine(path, "model_index.json")) || Directory.Exists(Path.Combine(path, "unet")))
                return FromDiffusersFolder(path);
            var files = WeightFiles(path);
            if (files.Count == 0)
                throw new LoraSharpException("no weight files (*.safetensors, pytorch_model*.bin) in this folder", path);
            return ModuleIndex.Combine(files.Select(f => FromTensorFile(f, "")).ToArray());
        }
        if (!File.Exists(path)) throw new LoraSharpException("no such file or folder", path);
        return FromTensorFile(path, "");
    }

    public static ModuleIndex FromDiffusersFolder(string folder)
    {
        var parts = new List<ModuleIndex>();
        foreach (var (sub, prefix) in DiffusersComponents)
        {
            var dir = Path.Combine(folder, sub);
            if (!Directory.Exists(dir)) continue;
            var files = WeightFiles(dir);
            if (files.Count == 0) throw new LoraSharpException($"component folder '{sub}' has no weight file", dir);
            parts.AddRange(files.Select(f => FromTensorFile(f, prefix)));
        }
        if (parts.Count == 0) throw new LoraSharpException("no unet/ or text_encoder/ component folder", folder);
        return ModuleIndex.Combine([.. parts]);
    }

    /// <summary>Weight files of a folder: safetensors preferred (fp32 variants over fp16 ones), else PyTorch .bin.</summary>
    static List<string> WeightFiles(string dir)
    {
        var safetensors = Directory.GetFiles(dir, "*.safetensors").Order(StringComparer.Ordinal).ToList();
        // diffusers folders may hold both model.safetensors and model.fp16.safetensors: one precision is enough.
        var plain = safetensors.Where(f => !Path.GetFileName(f).Contains(".fp16.", StringComparison.Ordinal)).ToList();
        if (plain.Count > 0) return plain;
        if (safetensors.Count > 0) return safetensors;
        return Directory.GetFiles(dir, "*.bin").Where(f => !Path.GetFileName(f).StartsWith("training_args", StringComparison.Ordinal))
            .Order(StringComparer.Ordinal).ToList();
    }

    static ModuleIndex FromTensorFile(string file, string prefix)
    {
        using var source = TensorFiles.Open(file);
        return ModuleIndex.FromStateDict(source.Keys.Select(k => new KeyValuePair<string, long[]>(k, source.Info(k).Shape)), prefix);
    }
}
