using System.Globalization;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.Models.Llama;
using LoraSharp.Quantization;

namespace LoraSharp.Training.Llm;

/// <summary>Loading PEFT (or other layout) adapters onto a Llama model for generation and merging.</summary>
public static class LlmAdapters
{
    /// <summary>Splits "DIR[:scale]" (the scale is taken only when the part after the last ':' is a number).</summary>
    public static (string Path, double Scale) ParseSpec(string spec)
    {
        int colon = spec.LastIndexOf(':');
        if (colon > 0 && double.TryParse(spec[(colon + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture, out var s))
            return (spec[..colon], s);
        return (spec, 1.0);
    }

    /// <summary>
    /// Reads each adapter (checked against the model's modules) and attaches it unmerged with its scale. With
    /// <paramref name="quantized"/> (the decoder linears are NF4, <see cref="LlmModelLoader"/>) the host knows the base
    /// is not resident (<see cref="AdapterHost.DequantizedWeight"/>), which DoRA adapters need.
    /// </summary>
    public static AdapterHost Attach(LlamaForCausalLM model, IEnumerable<(string Path, double Scale)> adapters, Nf4Linears? quantized = null)
    {
        var host = new AdapterHost(model);
        if (quantized is not null) host.DequantizedWeight = quantized.Dequantize;
        try
        {
            var index = ModuleIndex.FromModule(model);
            int n = 0;
            foreach (var (path, scale) in adapters)
            {
                using var read = AdapterFile.Read(path, index);
                host.Attach(read.Weights, $"adapter{n++}", scale);
            }
            return host;
        }
        catch
        {
            host.Dispose();
            throw;
        }
    }
}
