using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Llm;

/// <summary>What <see cref="LlmMerge.Merge"/> wrote.</summary>
/// <param name="MaxQuantizationDifference">For QLoRA adapters: max |W − dequant(NF4(W))| over the quantized linears
/// (how far the base the adapter was trained on is from the 16/32-bit base it was merged into).</param>
public sealed record LlmMergeReport(int MergedModules, IReadOnlyList<string> Files, double MaxAbsDelta, double? MaxQuantizationDifference);

/// <summary>Merges adapters into a Llama model's weights and writes an HF folder sharded like the input.</summary>
public static class LlmMerge
{
    static readonly string[] CopiedFiles =
        ["config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

    /// <summary>
    /// W ← W + Σ scale·ΔW for every adapter (in float32), written in each tensor's original dtype to
    /// <paramref name="outDir"/> with the input's shard names (safetensors; pytorch_model*.bin shards become
    /// model*.safetensors) and index. With <paramref name="quantizationReport"/> (QLoRA adapters) the NF4 round-trip
    /// error of the base is measured and reported.
    /// </summary>
    public static LlmMergeReport Merge(string modelDir, IEnumerable<(string Path, double Scale)> adapters, string outDir, bool quantizationReport)
    {
        if (Path.GetFullPath(modelDir) == Path.GetFullPath(outDir)) throw new LoraSharpException("the output folder must differ from the model folder", outDir);
        using var model = LlamaCheckpoint.Load(modelDir, ScalarType.Float32);
        double? quantDiff = null;
        if (quantizationReport)
        {
            double max = 0;
            foreach (var (path, lin) in model.LinearModules().Where(l => LlmModelLoader.IsQuantizable(l.Path)))
            {
                using var w = lin.weight!.detach().contiguous();
                var values = w.data<float>().ToArray();
                var deq = Nf4.Dequantize(Nf4.Quantize(values, [lin.out_features, lin.in_features]));
                for (int i = 0; i < values.Length; i++) max = Math.Max(max, Math.Abs(values[i] - deq[i]));
            }
            quantDiff = max;
        }
        var originals = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        using var host = LlmAdapters.Attach(model, adapters);
        host.Merge();
        double maxDelta = 0;
        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in parameters)
        {
            using var d = (p.detach() - originals[name]).abs().max();
            maxDelta = Math.Max(maxDelta, d.item<float>());
        }
        foreach (var t in originals.Values) t.Dispose();

        Directory.CreateDirectory(outDir);
        var files = LlamaCheckpoint.WeightFiles(modelDir);
        var written = new List<string>();
        var weightMap = new JsonObject();
        long totalSize = 0;
        foreach (var file in files)
        {
            var name = Path.GetFileName(file);
            var outName = name.StartsWith("pytorch_model", StringComparison.Ordinal) ? "model" + name["pytorch_model".Length..^".bin".Length] + ".safetensors" : name;
            using var source = TensorFiles.Open(file);
            var pending = new List<PendingTensor>();
            foreach (var key in source.Keys)
            {
                if (!parameters.TryGetValue(key, out var p)) continue; // e.g. rotary inv_freq buffers
                var info = source.Info(key);
                var dtype = SafetensorsDType.NativeType(info.DType) ?? ScalarType.Float32;
                pending.Add(new PendingTensor(key, dtype, p.shape, () => p.detach().to_type(dtype)));
                weightMap[key] = outName;
                totalSize += p.numel() * ElementSize(dtype);
            }
            SafetensorsWriter.Write(Path.Combine(outDir, outName), pending, new Dictionary<string, string> { ["format"] = "pt" });
            written.Add(outName);
        }
        if (files.Count > 1)
        {
            var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = totalSize }, ["weight_map"] = weightMap };
            AtomicFile.WriteAllText(Path.Combine(outDir, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            written.Add("model.safetensors.index.json");
        }
        foreach (var f in CopiedFiles)
            if (File.Exists(Path.Combine(modelDir, f)))
            {
                File.Copy(Path.Combine(modelDir, f), Path.Combine(outDir, f), overwrite: true);
                written.Add(f);
            }
        int merged = host.Adapters.Sum(a => a.Modules.Count);
        return new LlmMergeReport(merged, written, maxDelta, quantDiff);
    }

    static long ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        ScalarType.Byte or ScalarType.Int8 or ScalarType.Bool => 1,
        _ => 4,
    };
}
