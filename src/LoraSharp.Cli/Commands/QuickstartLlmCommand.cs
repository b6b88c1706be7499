using System.CommandLine;
using System.Globalization;
using LoraSharp.Demo;
using Spectre.Console;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp quickstart-llm</c>: trains a LoRA that teaches the demo language model a task it never saw ("swap: fox owl" → "owl fox"),
/// then prints the exact-match rate of the base model and of base + LoRA on held-out prompts.
/// </summary>
public static class QuickstartLlmCommand
{
    public static Command Create()
    {
        var d = new QuickstartLlmOptions();
        var config = new Option<string>("--config") { Description = $"Axolotl-style YAML. Default: {d.ConfigPath}.", DefaultValueFactory = _ => d.ConfigPath };
        var eval = new Option<string>("--eval") { Description = $"Held-out prompts (chat JSONL). Default: {d.EvalPath}.", DefaultValueFactory = _ => d.EvalPath };
        var root = new Option<string?>("--root") { Description = "Repository root for relative paths. Default: found from the working directory." };
        var output = new Option<string?>("--out") { Description = "Adapter output folder (overrides output_dir of the YAML: quickstart-llm-output)." };
        var steps = new Option<long?>("--steps") { Description = "Override max_steps of the YAML." };
        var examples = new Option<int>("--examples") { Description = "Example rows to print. Default: 6.", DefaultValueFactory = _ => 6 };
        var threads = new Option<int>("--threads") { Description = "Torch CPU threads (0 = libtorch's default; 1 is faster for this tiny model and on a crowded machine). Default: 1.", DefaultValueFactory = _ => 1 };
        var command = new Command("quickstart-llm", "Train a LoRA that teaches the built-in demo language model a new task, then compare base and LoRA answers.")
        {
            config, eval, root, output, steps, examples, threads,
        };
        command.SetAction(r => CliErrors.Run(() =>
        {
            if (r.GetValue(threads) > 0) TorchSharp.torch.set_num_threads(r.GetValue(threads));
            return Run(new QuickstartLlmOptions
            {
                ConfigPath = r.GetValue(config)!, EvalPath = r.GetValue(eval)!, Root = r.GetValue(root), OutputDir = r.GetValue(output), MaxSteps = r.GetValue(steps),
            }, r.GetValue(examples));
        }));
        return command;
    }

    public static int Run(QuickstartLlmOptions options, int exampleRows)
    {
        AnsiConsole.MarkupLine("[bold]LoraSharp quickstart-llm[/]: the demo language model ([grey]models/demo/llm[/], Llama architecture) was pretrained on ten generated tasks " +
                               "(copy, first, last, count, …) but never on [bold]swap[/]. A LoRA trained on [grey]examples/quickstart/llm/train.jsonl[/] teaches it.");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var qs = new QuickstartLlm(options, line => AnsiConsole.MarkupLine("[grey]" + Markup.Escape(line) + "[/]"));
        QuickstartLlmResult? result = null;
        AnsiConsole.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                var baseEval = ctx.AddTask("answering with the base model");
                var train = ctx.AddTask("training the LoRA", autoStart: false);
                var loraEval = ctx.AddTask("answering with base + LoRA", autoStart: false);
                qs.EvalProgress += (which, done, total) =>
                {
                    var task = which == "base" ? baseEval : loraEval;
                    if (!task.IsStarted) task.StartTask();
                    task.MaxValue = total;
                    task.Value = done;
                };
                qs.TrainProgress += p =>
                {
                    if (!train.IsStarted) train.StartTask();
                    train.MaxValue = p.TotalSteps;
                    train.Value = p.Step;
                    train.Description = $"training the LoRA, loss {p.Loss.ToString("0.000", CultureInfo.InvariantCulture)}";
                };
                result = qs.Run();
            });
        var r = result!;
        var rows = new Table().AddColumns("prompt", "expected", "base", "base + LoRA");
        foreach (var (b, l) in r.Base.Rows.Zip(r.Lora.Rows).Take(exampleRows))
            rows.AddRow(Markup.Escape(b.Prompt), Markup.Escape(b.Expected), Mark(b), Mark(l));
        AnsiConsole.Write(rows);
        var table = new Table().AddColumns("model", "exact match on held-out prompts");
        table.AddRow("base (no LoRA)", $"{r.Base.Correct}/{r.Base.Rows.Count} ({r.Base.Rate.ToString("P0", CultureInfo.InvariantCulture)})");
        table.AddRow("base + LoRA", $"{r.Lora.Correct}/{r.Lora.Rows.Count} ({r.Lora.Rate.ToString("P0", CultureInfo.InvariantCulture)})");
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine($"trained {r.Steps} steps on {r.TrainExamples} examples in {r.TrainTime.TotalSeconds:0} s (final loss {r.FinalLoss.ToString("0.000", CultureInfo.InvariantCulture)}), " +
                               $"answered 2 × {r.Base.Rows.Count} prompts in {r.EvalTime.TotalSeconds:0} s; total {clock.Elapsed.TotalSeconds:0} s");
        AnsiConsole.MarkupLine($"LoRA (PEFT): [green]{Markup.Escape(r.AdapterPath)}[/]");
        if (r.LossCurvePath is not null) AnsiConsole.MarkupLine($"loss curve:  [green]{Markup.Escape(r.LossCurvePath)}[/]");
        AnsiConsole.MarkupLine("Try it: [grey]lorasharp generate-text --model models/demo/llm --adapter " + Markup.Escape(r.AdapterPath) + " --chat --prompt \"swap: cat owl\"[/]");
        return 0;
    }

    static string Mark(ExactMatch.Row row) => (row.Correct ? "[green]" : "[red]") + Markup.Escape(row.Output) + "[/]";
}
