using TorchSharp;

namespace LoraSharp.Formats;

/// <summary>The layouts <see cref="AdapterConverter"/> writes.</summary>
public enum AdapterLayout { Kohya, Diffusers, Peft }

/// <summary>
/// Converts adapter files between the kohya/A1111/LyCORIS, diffusers and PEFT layouts, losslessly: factors are
/// copied as they are and alphas recomputed so every module's effective ΔW is unchanged. kohya names can only be
/// turned into module paths with the base model's module list (<c>--model</c>); a layout that cannot hold an
/// algorithm (LoKr in a diffusers file) is refused.
/// </summary>
public static class AdapterConverter
{
    public sealed record Result(string Output, int Modules, CoverageReport Coverage);

    public static Result Convert(string input, string output, AdapterLayout to, ModuleIndex? model = null,
        bool lenient = false, torch.ScalarType? saveDType = null)
    {
        using var loaded = AdapterFile.Read(input, model, new AdapterReadOptions { Lenient = lenient || model is null });
        if (model is null && loaded.KeyFormats.Contains(KeyFormat.Kohya) && to != AdapterLayout.Kohya)
            throw new LoraSharpException(
                "kohya names (lora_unet_…) cannot be turned into module paths without the base model: pass --model with the checkpoint or diffusers folder",
                input);
        if (model is null && loaded.Coverage.UnmatchedCount > 0 && !lenient)
            throw new LoraSharpException($"{loaded.Coverage.UnmatchedCount} keys are not adapter keys\n{loaded.Coverage.ToText()}Use --lenient to drop them.", input);
        var weights = loaded.Weights;
        switch (to)
        {
            case AdapterLayout.Kohya:
                if (loaded.KeyFormats.SetEquals([KeyFormat.Kohya]) && model is null)
                {
                    // kohya → kohya without a model: names stay as they are.
                    KohyaAdapterWriter.Write(output, weights, new KohyaWriteOptions { SaveDType = saveDType, NameOf = p => p });
                    break;
                }
                if (weights.Modules.Any(m => KohyaAdapterWriter.KohyaName(m.ModulePath, false) is null))
                    throw new LoraSharpException("the kohya layout names Stable Diffusion modules (unet., text_encoder.); this adapter targets a language model — use --to peft", input);
                KohyaAdapterWriter.Write(output, weights, new KohyaWriteOptions { SaveDType = saveDType });
                break;
            case AdapterLayout.Diffusers:
                PeftAdapterWriter.WriteDiffusersFile(output, weights, saveDType);
                break;
            case AdapterLayout.Peft:
                PeftAdapterWriter.WritePeftFolder(output, weights, new PeftWriteOptions
                {
                    SaveDType = saveDType,
                    BaseModelNameOrPath = loaded.PeftConfig?.BaseModelNameOrPath,
                    TaskType = loaded.PeftConfig?.TaskType,
                });
                break;
        }
        return new Result(output, weights.Modules.Count, loaded.Coverage);
    }
}
