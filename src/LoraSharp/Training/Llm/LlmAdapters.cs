using System.Globalization;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.Models.Llama;

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
    /// <paramref name="nf4Base"/> (the decoder linears are NF4, <see cref="LlmModelLoader"/>) DoRA adapters are refused:
    /// their magnitude needs the full-precision weight norms, as in training.
    /// </summary>
    public static AdapterHost Attach(LlamaForCausalLM model, IEnumerable<(string Path, double Scale)> adapters, bool nf4Base = false)
    {
        var host = new AdapterHost(model);
        try
        {
            var index = ModuleIndex.FromModule(model);
            int n = 0;
            foreach (var (path, scale) in adapters)
            {
                using var read = AdapterFile.Read(path, index);
                var attached = host.Attach(read.Weights, $"adapter{n++}", scale);
                if (nf4Base && attached.Modules.FirstOrDefault(m => m.Dora != DoraKind.None) is { } dora)
                    throw new LoraSharpException("a DoRA adapter cannot run on the NF4 (4-bit) base: its magnitude needs the full-precision weight norms; load the base without --load-in-4bit",
                        path, dora.ModulePath);
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
