using System.CommandLine;
using LoraSharp.Training.Llm;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp merge-adapter --model DIR --adapter DIR[:scale] --out DIR [--qlora]</c>.</summary>
public static class MergeAdapterCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "HF Llama model folder (the 16/32-bit base).", Required = true };
        var adapters = new Option<string[]>("--adapter") { Description = "Adapter folder or file, optionally with :scale (repeatable).", Required = true };
        var output = new Option<string>("--out") { Description = "Output folder (HF layout, sharded like the input).", Required = true };
        var qlora = new Option<bool>("--qlora") { Description = "The adapter was trained on the NF4 base: report the base's quantization error (automatic when the adapter folder says so)." };
        var command = new Command("merge-adapter", "Merge LoRA adapters into a Llama model and write a plain HF model folder.")
        {
            model, adapters, output, qlora,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var specs = parse.GetValue(adapters)!.Select(LlmAdapters.ParseSpec).ToList();
            bool isQlora = parse.GetValue(qlora) || specs.Any(s => LlmTrainer.WasTrainedOnNf4(s.Path));
            var report = LlmMerge.Merge(parse.GetValue(model)!, specs, parse.GetValue(output)!, isQlora);
            Console.WriteLine($"merged {report.MergedModules} module(s); max |ΔW| {report.MaxAbsDelta:G4}; wrote {string.Join(", ", report.Files)} to {parse.GetValue(output)}");
            if (report.MaxQuantizationDifference is double q)
                Console.WriteLine($"QLoRA: merged into the original base; max |W − dequant(NF4(W))| of the base the adapter was trained on: {q:G4}");
            return 0;
        }));
        return command;
    }
}
