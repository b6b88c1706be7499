using System.CommandLine;
using LoraSharp.Formats;
using TorchSharp;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp convert IN OUT --to kohya|diffusers|peft</c>: rewrite an adapter in another layout.</summary>
public static class ConvertCommand
{
    public static Command Create()
    {
        var input = new Argument<string>("input") { Description = "Adapter file (.safetensors, .pt, .bin) or PEFT folder." };
        var output = new Argument<string>("output") { Description = "Output file (kohya, diffusers) or folder (peft)." };
        var to = new Option<AdapterLayout>("--to") { Description = "Target layout: Kohya (A1111/ComfyUI/Civitai), Diffusers, Peft.", Required = true };
        var model = new Option<string?>("--model") { Description = "Base model (single-file SD checkpoint, diffusers folder, HF folder or tensor file); needed to resolve kohya names." };
        var lenient = new Option<bool>("--lenient") { Description = "Drop keys that match no module instead of failing (they are reported)." };
        var dtype = new Option<string?>("--save-dtype") { Description = "fp32, fp16 or bf16 (default: keep the input's dtype)." };
        var command = new Command("convert", "Convert an adapter between the kohya, diffusers and PEFT layouts (lossless).")
        {
            input, output, to, model, lenient, dtype,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var result = Run(parse.GetValue(input)!, parse.GetValue(output)!, parse.GetValue(to), parse.GetValue(model),
                parse.GetValue(lenient), ParseDType(parse.GetValue(dtype)));
            if (result.Coverage.UnmatchedCount > 0) Console.Error.Write(result.Coverage.ToText());
            Console.WriteLine($"wrote {result.Output} ({result.Modules} modules, {parse.GetValue(to)} layout)");
            return 0;
        }));
        return command;
    }

    /// <summary>
    /// Converts with the base model's module index read from its headers (<see cref="LoraSharp.Tools.ModelCheckpoint"/>):
    /// a single-file SD checkpoint's ldm keys are mapped to the diffusers module names kohya's names derive from.
    /// </summary>
    public static AdapterConverter.Result Run(string input, string output, AdapterLayout to, string? modelPath, bool lenient, torch.ScalarType? dtype)
    {
        if (modelPath is null) return AdapterConverter.Convert(input, output, to, null, lenient, dtype);
        using var model = LoraSharp.Tools.ModelCheckpoint.Open(modelPath);
        return AdapterConverter.Convert(input, output, to, model.Index, lenient, dtype);
    }

    internal static torch.ScalarType? ParseDType(string? name) => name?.ToLowerInvariant() switch
    {
        null => null,
        "fp32" or "float" or "float32" => torch.ScalarType.Float32,
        "fp16" or "half" or "float16" => torch.ScalarType.Float16,
        "bf16" or "bfloat16" => torch.ScalarType.BFloat16,
        _ => throw new LoraSharpException($"unknown dtype '{name}' (expected fp32, fp16 or bf16)", null, "--save-dtype"),
    };
}
