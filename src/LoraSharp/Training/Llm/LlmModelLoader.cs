using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Training.Llm;

/// <summary>A loaded base model, with its NF4 store when the linears are quantized (QLoRA).</summary>
public sealed class LlmBaseModel : IDisposable
{
    public required LlamaForCausalLM Model { get; init; }
    public Nf4Linears? Quantized { get; init; }

    /// <summary>Bytes of the stored base weights: NF4 buffers plus every parameter that is not a quantized linear's weight.</summary>
    public long WeightBytes
    {
        get
        {
            var shared = Quantized is null ? new HashSet<string>() : Quantized.Paths.Select(p => p + ".weight").ToHashSet();
            var seen = new HashSet<IntPtr>();
            long bytes = Quantized?.StorageBytes ?? 0;
            foreach (var (name, p) in Model.named_parameters())
                if (!shared.Contains(name) && seen.Add(p.Handle)) bytes += p.numel() * p.element_size();
            return bytes;
        }
    }

    /// <summary>Distinct base parameters (quantized weights counted once each).</summary>
    public long ParameterCount
    {
        get
        {
            var shared = Quantized is null ? new HashSet<string>() : Quantized.Paths.Select(p => p + ".weight").ToHashSet();
            var seen = new HashSet<IntPtr>();
            long n = Quantized?.QuantizedParameters ?? 0;
            foreach (var (name, p) in Model.named_parameters())
                if (!shared.Contains(name) && seen.Add(p.Handle)) n += p.numel();
            return n;
        }
    }

    public void Dispose()
    {
        Quantized?.Dispose();
        Model.Dispose();
    }
}

/// <summary>Loads HF Llama folders for training, optionally with the decoder linears stored in NF4.</summary>
public static class LlmModelLoader
{
    /// <summary>Which linears QLoRA quantizes: every Linear inside the decoder layers (not lm_head).</summary>
    public static bool IsQuantizable(string modulePath) => modulePath.StartsWith("model.layers.", StringComparison.Ordinal);

    /// <summary>
    /// Loads <paramref name="folder"/> with parameters in <paramref name="dtype"/>. With <paramref name="quantize"/>,
    /// each decoder Linear weight is read (as float32), quantized to NF4 and dropped before the next is read, so the
    /// full-precision linears are never resident together; the model's other parameters load normally.
    /// </summary>
    public static LlmBaseModel Load(string folder, ScalarType dtype, bool quantize, Device? device = null)
    {
        if (!quantize)
            return new LlmBaseModel { Model = LlamaCheckpoint.Load(folder, dtype, device) };

        var config = LlamaConfig.Load(folder);
        var model = new LlamaForCausalLM(config, dtype, device, WeightInit.Empty);
        var nf4 = new Nf4Linears();
        try
        {
            var linears = model.named_modules().Where(m => m.module is Linear && IsQuantizable(m.name))
                .ToDictionary(m => m.name + ".weight", m => (m.name, (Linear)m.module));
            var parameters = new Dictionary<string, Parameter>();
            foreach (var (name, p) in model.named_parameters()) parameters.TryAdd(name, p);
            var done = new HashSet<string>();
            using var noGrad = torch.no_grad();
            foreach (var file in LlamaCheckpoint.WeightFiles(folder))
            {
                using var source = TensorFiles.Open(file);
                foreach (var key in source.Keys)
                {
                    if (key.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal) || (config.TieWordEmbeddings && key == "lm_head.weight")) continue;
                    if (linears.TryGetValue(key, out var lin))
                    {
                        float[] values;
                        using (var t = source.Load(key, ScalarType.Float32))
                        {
                            if (!t.shape.SequenceEqual(new[] { lin.Item2.out_features, lin.Item2.in_features }))
                                throw new LoraSharpException($"shape [{string.Join(", ", t.shape)}] does not fit Linear({lin.Item2.in_features}→{lin.Item2.out_features})", file, key);
                            values = t.contiguous().data<float>().ToArray();
                        }
                        nf4.Add(lin.Item1, lin.Item2, Nf4.Quantize(values, [lin.Item2.out_features, lin.Item2.in_features]), dtype);
                        done.Add(key);
                        continue;
                    }
                    if (!parameters.TryGetValue(key, out var p)) throw new LoraSharpException("the model has no parameter for this tensor", file, key);
                    using (var scope = NewDisposeScope())
                    using (var t = source.Load(key, p.dtype, p.device))
                    {
                        if (!t.shape.SequenceEqual(p.shape)) throw new LoraSharpException($"shape [{string.Join(", ", t.shape)}] differs from the model's [{string.Join(", ", p.shape)}]", file, key);
                        p.copy_(t);
                    }
                    done.Add(key);
                }
            }
            var missing = parameters.Keys.Where(k => !done.Contains(k) && !(config.TieWordEmbeddings && k == "lm_head.weight")).ToList();
            if (missing.Count > 0) throw new LoraSharpException($"checkpoint is missing {missing.Count} tensor(s): {string.Join(", ", missing.Take(10))}", folder);
            model.eval();
            return new LlmBaseModel { Model = model, Quantized = nf4 };
        }
        catch
        {
            nf4.Dispose();
            model.Dispose();
            throw;
        }
    }
}
