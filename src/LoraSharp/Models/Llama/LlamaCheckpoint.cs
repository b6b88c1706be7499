using System.Text.Json;
using LoraSharp.IO;
using Microsoft.Win32.SafeHandles;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>What a name-checked weight copy found.</summary>
/// <param name="Loaded">Parameters filled from the files.</param>
/// <param name="Missing">Model parameters no file provides (lm_head.weight is not listed when embeddings are tied).</param>
/// <param name="Unexpected">File keys the model has no parameter for.</param>
/// <param name="Mismatched">Keys present in both with different shapes.</param>
public sealed record LlamaLoadReport(
    IReadOnlyList<string> Loaded,
    IReadOnlyList<string> Missing,
    IReadOnlyList<string> Unexpected,
    IReadOnlyList<ShapeMismatch> Mismatched)
{
    public bool IsComplete => Missing.Count == 0 && Unexpected.Count == 0 && Mismatched.Count == 0;

    public override string ToString()
    {
        static string List(IEnumerable<string> items) { var a = items.ToList(); return string.Join(", ", a.Take(20)) + (a.Count > 20 ? $", ... ({a.Count} in all)" : ""); }
        var parts = new List<string> { $"{Loaded.Count} loaded" };
        if (Missing.Count > 0) parts.Add($"{Missing.Count} missing: {List(Missing)}");
        if (Unexpected.Count > 0) parts.Add($"{Unexpected.Count} unexpected: {List(Unexpected)}");
        if (Mismatched.Count > 0) parts.Add($"{Mismatched.Count} with wrong shape: {List(Mismatched.Select(m => m.ToString()))}");
        return string.Join("; ", parts);
    }
}

public sealed record ShapeMismatch(string Key, long[] Expected, long[] Found)
{
    public override string ToString() => $"{Key} (model [{string.Join(", ", Expected)}], file [{string.Join(", ", Found)}])";
}

/// <summary>
/// Loads Hugging Face LLaMA-family folders: <c>config.json</c> plus <c>model.safetensors</c>, sharded
/// <c>model.safetensors.index.json</c>, or <c>pytorch_model.bin</c> (and its index). The model is built with empty
/// parameters and each tensor is read from its file straight into its parameter, so at most one tensor exists
/// twice at any time.
/// </summary>
public static class LlamaCheckpoint
{
    /// <summary>Keys older checkpoints carry that the model recomputes (RoPE's inverse frequencies).</summary>
    static bool IsIgnorable(string key) => key.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal);

    /// <summary>
    /// Reads config and weights from <paramref name="folder"/> into a new model with parameters in
    /// <paramref name="dtype"/> on <paramref name="device"/> (default CPU).
    /// </summary>
    /// <param name="strict">True (default): any missing, unexpected or mis-shaped key is a <see cref="LoraSharpException"/> listing them.</param>
    public static LlamaForCausalLM Load(string folder, ScalarType dtype = ScalarType.Float32, Device? device = null, bool strict = true) =>
        Load(folder, out _, dtype, device, strict);

    /// <inheritdoc cref="Load(string, ScalarType, Device?, bool)"/>
    public static LlamaForCausalLM Load(string folder, out LlamaLoadReport report, ScalarType dtype = ScalarType.Float32,
        Device? device = null, bool strict = true)
    {
        var config = LlamaConfig.Load(folder);
        var model = new LlamaForCausalLM(config, dtype, device, WeightInit.Empty);
        try
        {
            report = LoadWeights(model, WeightFiles(folder), strict);
            model.eval();
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The weight files of a folder, in preference order: model.safetensors, model.safetensors.index.json shards,
    /// pytorch_model.bin, pytorch_model.bin.index.json shards.
    /// </summary>
    public static IReadOnlyList<string> WeightFiles(string folder)
    {
        if (!Directory.Exists(folder))
            throw new LoraSharpException("model folder not found", folder);
        foreach (var (single, index) in new[] { ("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json") })
        {
            var singlePath = Path.Combine(folder, single);
            if (File.Exists(singlePath)) return [singlePath];
            var indexPath = Path.Combine(folder, index);
            if (File.Exists(indexPath)) return ShardsOf(indexPath);
        }
        throw new LoraSharpException("no weights found: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json", folder);
    }

    static IReadOnlyList<string> ShardsOf(string indexPath)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllText(indexPath)); }
        catch (JsonException e) { throw new LoraSharpException("invalid JSON: " + e.Message, indexPath, inner: e); }
        using (doc)
        {
            if (!doc.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new LoraSharpException("expected an object 'weight_map' (tensor key -> shard file)", indexPath, "weight_map");
            var dir = Path.GetDirectoryName(Path.GetFullPath(indexPath))!;
            var shards = new List<string>();
            foreach (var entry in map.EnumerateObject())
            {
                if (entry.Value.ValueKind != JsonValueKind.String)
                    throw new LoraSharpException("expected a shard file name", indexPath, "weight_map." + entry.Name);
                var name = entry.Value.GetString()!;
                if (name.Contains('/') || name.Contains('\\') || name.Contains(".."))
                    throw new LoraSharpException($"shard '{name}' must be a file name in the same folder", indexPath, "weight_map." + entry.Name);
                var shard = Path.Combine(dir, name);
                if (!shards.Contains(shard)) shards.Add(shard);
            }
            foreach (var shard in shards)
                if (!File.Exists(shard))
                    throw new LoraSharpException($"shard {Path.GetFileName(shard)} listed in the index does not exist", indexPath);
            return shards;
        }
    }

    /// <summary>Opens a weight file (safetensors or torch.save zip, by its magic bytes) with positional reads, so no mapped pages stay in the process.</summary>
    static ITensorSource Open(string path) => TensorFiles.Open(path, TensorReadMode.PositionalRead);

    /// <summary>
    /// Copies the tensors of <paramref name="files"/> into the model's parameters by name, converting dtype and
    /// device, one tensor at a time. Returns what matched; with <paramref name="strict"/> a mismatch throws.
    /// </summary>
    public static LlamaLoadReport LoadWeights(LlamaForCausalLM model, IEnumerable<string> files, bool strict = true)
    {
        var parameters = new Dictionary<string, Tensor>();
        foreach (var (name, p) in model.named_parameters())
            parameters.TryAdd(name, p);
        bool tied = model.Config.TieWordEmbeddings;

        var loaded = new List<string>();
        var unexpected = new List<string>();
        var mismatched = new List<ShapeMismatch>();
        var seen = new HashSet<string>();
        var fileList = files.ToList();

        // Check every name and shape before touching a parameter, so a bad checkpoint fails fast.
        var plan = new List<(string File, string Key)>();
        foreach (var file in fileList)
        {
            using var source = Open(file);
            foreach (var key in source.Keys)
            {
                if (IsIgnorable(key) || (tied && key == "lm_head.weight")) continue;
                if (!parameters.TryGetValue(key, out var p)) { unexpected.Add(key); continue; }
                if (!seen.Add(key)) throw new LoraSharpException("tensor appears in more than one shard", file, key);
                var info = source.Info(key);
                if (!info.Shape.SequenceEqual(p.shape)) { mismatched.Add(new ShapeMismatch(key, p.shape, info.Shape)); continue; }
                plan.Add((file, key));
            }
        }
        var missing = parameters.Keys.Where(k => !seen.Contains(k) && !(tied && k == "lm_head.weight")).ToList();
        var report = new LlamaLoadReport(loaded, missing, unexpected, mismatched);
        if (strict && !report.IsComplete)
            throw new LoraSharpException("checkpoint does not match the model: " + report,
                fileList.Count == 1 ? fileList[0] : Path.GetDirectoryName(fileList.FirstOrDefault() ?? ""));

        using var noGrad = torch.no_grad();
        foreach (var group in plan.GroupBy(x => x.File))
        {
            using var source = Open(group.Key);
            using var handle = source is SafetensorsFile ? File.OpenHandle(group.Key, FileMode.Open, FileAccess.Read, FileShare.Read) : null;
            foreach (var (_, key) in group)
            {
                var parameter = parameters[key];
                if (handle is not null && TryReadInPlace((SafetensorsFile)source, handle, key, parameter))
                {
                    loaded.Add(key);
                    continue;
                }
                using var scope = NewDisposeScope();
                using var t = source.Load(key, parameter.dtype, parameter.device);
                parameter.copy_(t);
                loaded.Add(key);
            }
        }
        return report;
    }

    /// <summary>
    /// Writes the model's parameters to one safetensors file under their HF names (lm_head.weight left out when tied,
    /// as HF does), one tensor at a time, optionally cast to <paramref name="dtype"/>.
    /// </summary>
    public static void SaveWeights(LlamaForCausalLM model, string path, ScalarType? dtype = null, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var tensors = model.named_parameters()
            .Where(p => !(model.Config.TieWordEmbeddings && p.name == "lm_head.weight"))
            .Select(p => new PendingTensor(p.name, dtype ?? p.parameter.dtype, p.parameter.shape,
                () => p.parameter.detach().to_type(dtype ?? p.parameter.dtype)))
            .ToList();
        SafetensorsWriter.Write(path, tensors, metadata ?? new Dictionary<string, string> { ["format"] = "pt" });
    }

    /// <summary>
    /// CPU parameter and a dtype TorchSharp has: read the stored bytes with positioned file reads straight into the
    /// parameter's memory (same dtype), or through one reused 64 MB buffer converted chunk by chunk (other dtype).
    /// No whole-tensor temporary and no mapped file pages stay in the process.
    /// </summary>
    static bool TryReadInPlace(SafetensorsFile source, SafeFileHandle handle, string key, Tensor parameter)
    {
        var info = source.Info(key);
        var stored = SafetensorsDType.NativeType(info.DType);
        if (stored is null || parameter.device_type != DeviceType.CPU || !parameter.is_contiguous() || !BitConverter.IsLittleEndian)
            return false;
        long elementSize = SafetensorsDType.ElementSize(info.DType), count = parameter.numel();
        if (count * elementSize != info.ByteLength || count == 0) return false;
        long offset = source.DataOffset(key);
        long chunk = (1L << 26) / elementSize;
        using var flat = parameter.view(-1);
        using var buffer = stored == parameter.dtype ? null : torch.empty(Math.Min(chunk, count), dtype: stored.Value);
        for (long start = 0; start < count; start += chunk)
        {
            long n = Math.Min(chunk, count - start);
            using var part = flat.narrow(0, start, n);
            if (buffer is null)
            {
                ReadExactly(handle, part.bytes, offset + start * elementSize, source.FilePath, key);
                continue;
            }
            using var slice = buffer.narrow(0, 0, n);
            ReadExactly(handle, slice.bytes, offset + start * elementSize, source.FilePath, key);
            part.copy_(slice);
        }
        return true;
    }

    static void ReadExactly(SafeFileHandle handle, Span<byte> span, long fileOffset, string file, string key)
    {
        for (int done = 0; done < span.Length;)
        {
            int read = RandomAccess.Read(handle, span[done..], fileOffset + done);
            if (read <= 0) throw new LoraSharpException("file ended inside the tensor's data", file, key);
            done += read;
        }
    }
}
