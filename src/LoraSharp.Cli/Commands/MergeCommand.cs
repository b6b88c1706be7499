using System.CommandLine;
using LoraSharp.Tools;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp merge --model CKPT --lora A:0.8 --lora B:0.5 --out OUT</c>: bake LoRAs into a model.</summary>
public static class MergeCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Base model: SD single file (.safetensors/.ckpt), diffusers folder, or HF model folder (safetensors shards).", Required = true };
        var loras = new Option<string[]>("--lora") { Description = "Adapter file or PEFT folder, optionally :RATIO (default 1). Repeatable.", Required = true, Arity = ArgumentArity.OneOrMore };
        var output = new Option<string>("--out") { Description = "Output: a .safetensors file (single-file models) or a folder (same layout as the input).", Required = true };
        var dtype = new Option<string?>("--save-dtype") { Description = "fp16, bf16 or fp32 for the written floating tensors (default: keep each tensor's dtype)." };
        var lenient = new Option<bool>("--lenient") { Description = "Adapter keys that match no module are reported instead of failing." };
        var command = new Command("merge", "Merge LoRAs (any algorithm, any layout) into a Stable Diffusion checkpoint or an LLM, tensor by tensor.")
        {
            model, loras, output, dtype, lenient,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var inputs = parse.GetValue(loras)!.Select(LoraInput.Parse).ToList();
            var report = LoraMerger.MergeIntoModel(parse.GetValue(model)!, inputs, parse.GetValue(output)!, new MergeIntoModelOptions
            {
                SaveDType = ConvertCommand.ParseDType(parse.GetValue(dtype)),
                Lenient = parse.GetValue(lenient),
            });
            for (int i = 0; i < inputs.Count; i++)
            {
                var c = report.Coverage[i];
                Console.WriteLine($"{inputs[i].Path} × {inputs[i].Ratio}: {c.MatchedKeys}/{c.TotalKeys} keys, {c.TargetedModules.Count} modules merged");
                if (c.UnmatchedCount > 0) Console.Error.Write(c.ToText());
            }
            Console.WriteLine($"wrote {report.Output}: {report.TensorsChanged} tensors changed ({report.ModulesChanged} modules), {report.TensorsCopied} copied unchanged");
            return 0;
        }));
        return command;
    }
}
