using System.CommandLine;
using System.Globalization;
using LoraSharp.Demo;
using Spectre.Console;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp demo init-llm</c>: writes the demo language model's HF folder with random weights;
/// <c>lorasharp demo pretrain-llm</c>: pretrains it (full-parameter, through the train-llm trainer) on the generated corpus.
/// </summary>
public static class DemoLlmCommand
{
    public static Command InitLlm()
    {
        var seed = new Option<int>("--seed") { Description = "Seed of the initial weights. Default: 1.", DefaultValueFactory = _ => 1 };
        var output = new Option<string>("--out") { Description = "Folder to write (HF layout).", Required = true };
        var cmd = new Command("init-llm", "Write the demo language model (Llama architecture, tokenizer, chat template) with random weights.") { seed, output };
        cmd.SetAction(r => CliErrors.Run(() =>
        {
            var config = DemoLlm.InitFolder(r.GetValue(output)!, r.GetValue(seed));
            Console.WriteLine($"wrote {r.GetValue(output)}: {config.ParameterCount():N0} parameters, vocabulary {config.VocabSize}, hidden {config.HiddenSize}, {config.NumHiddenLayers} layers");
            return 0;
        }));
        return cmd;
    }

    public static Command LlmData()
    {
        var output = new Option<string>("--out") { Description = "Folder for train.jsonl and eval.jsonl. Default: examples/quickstart/llm.", DefaultValueFactory = _ => Path.Combine("examples", "quickstart", "llm") };
        var train = new Option<int>("--train") { Description = "Training examples. Default: 600.", DefaultValueFactory = _ => 600 };
        var eval = new Option<int>("--eval") { Description = "Evaluation examples (prompts distinct from the training ones). Default: 50.", DefaultValueFactory = _ => 50 };
        var seed = new Option<int>("--seed") { Description = "Seed (the evaluation set uses seed + 1). Default: 7.", DefaultValueFactory = _ => 7 };
        var cmd = new Command("llm-data", "Write the quickstart's data for the held-out task (swap: two words in swapped order).") { output, train, eval, seed };
        cmd.SetAction(r => CliErrors.Run(() =>
        {
            var (t, e) = DemoLlm.WriteQuickstartData(r.GetValue(output)!, r.GetValue(train), r.GetValue(eval), r.GetValue(seed));
            Console.WriteLine($"wrote {t} and {e}");
            return 0;
        }));
        return cmd;
    }

    public static Command PretrainLlm()
    {
        var d = new DemoLlmPretrainOptions();
        var seed = new Option<int>("--seed") { Description = $"Seed of the corpus, the initial weights and the batches. Default: {d.Seed}.", DefaultValueFactory = _ => d.Seed };
        var output = new Option<string>("--out") { Description = "Model folder to write. Default: models/demo/llm.", DefaultValueFactory = _ => Path.Combine("models", "demo", "llm") };
        var examples = new Option<int>("--examples") { Description = $"Generated examples in the corpus. Default: {d.Examples}.", DefaultValueFactory = _ => d.Examples };
        var steps = new Option<int>("--steps") { Description = $"Optimizer steps. Default: {d.Steps}.", DefaultValueFactory = _ => d.Steps };
        var batch = new Option<int>("--batch") { Description = $"Examples per step. Default: {d.BatchSize}.", DefaultValueFactory = _ => d.BatchSize };
        var lr = new Option<double>("--lr") { Description = $"Peak learning rate (cosine, {d.WarmupSteps} warm-up steps). Default: {d.LearningRate}.", DefaultValueFactory = _ => d.LearningRate };
        var work = new Option<string?>("--work") { Description = "Keep the random-init model, the corpus and the YAML in this folder (default: a temporary folder)." };
        var threads = new Option<int>("--threads") { Description = "Torch CPU threads (0 = libtorch's default). Default: 0.", DefaultValueFactory = _ => 0 };
        var cmd = new Command("pretrain-llm", "Pretrain the demo language model from random weights on the generated task corpus (\"swap\" is held out).")
        {
            seed, output, examples, steps, batch, lr, work, threads,
        };
        cmd.SetAction(r => CliErrors.Run(() =>
        {
            if (r.GetValue(threads) > 0) TorchSharp.torch.set_num_threads(r.GetValue(threads));
            var o = d with
            {
                Seed = r.GetValue(seed), Examples = r.GetValue(examples), Steps = r.GetValue(steps), BatchSize = r.GetValue(batch),
                LearningRate = r.GetValue(lr), WorkDir = r.GetValue(work),
            };
            DemoLlmPretrainResult? result = null;
            AnsiConsole.Progress()
                .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("pretraining", maxValue: o.Steps);
                    result = DemoLlm.Pretrain(r.GetValue(output)!, o, p =>
                    {
                        task.Value = p.Step;
                        task.Description = Markup.Escape($"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4} lr {p.LearningRate:G3}");
                        if (p.EvalLoss is double e) AnsiConsole.MarkupLine(Markup.Escape($"step {p.Step}: eval loss {e:F4}"));
                    }, line => AnsiConsole.MarkupLine("[grey]" + Markup.Escape(line) + "[/]"));
                });
            var res = result!;
            var table = new Table().AddColumns("", "value");
            table.AddRow("model", Markup.Escape(res.ModelDir));
            table.AddRow("parameters", res.Parameters.ToString("N0", CultureInfo.InvariantCulture));
            table.AddRow("steps", res.Steps.ToString(CultureInfo.InvariantCulture));
            table.AddRow("loss", $"{res.FirstLoss:0.000} → {res.FinalLoss:0.0000} (mean of the last 10 % of steps)" + (res.FinalEvalLoss is double ev ? $", eval {ev:0.0000}" : ""));
            table.AddRow("time", $"training {res.TrainTime.TotalSeconds:0} s, total {res.TotalTime.TotalSeconds:0} s");
            foreach (var (task, acc) in res.TaskAccuracy) table.AddRow($"exact match: {task}", acc.ToString("P0", CultureInfo.InvariantCulture));
            AnsiConsole.Write(table);
            return 0;
        }));
        return cmd;
    }
}
