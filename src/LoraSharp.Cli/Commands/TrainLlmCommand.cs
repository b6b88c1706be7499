using System.CommandLine;
using LoraSharp.Training.Llm;
using Spectre.Console;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp train-llm CONFIG.yaml [--resume] [--resume-from DIR]</c>: LoRA / QLoRA / full fine-tuning of a Llama model.</summary>
public static class TrainLlmCommand
{
    public static Command Create()
    {
        var config = new Argument<string>("config") { Description = "Axolotl-style YAML config (base_model, datasets, adapter, lora_r, …)." };
        var resume = new Option<bool>("--resume") { Description = "Continue from the newest checkpoint-N under output_dir." };
        var resumeFrom = new Option<string?>("--resume-from") { Description = "Continue from this checkpoint folder." };
        var command = new Command("train-llm", "Fine-tune a Llama-family model with LoRA, QLoRA (NF4) or fully, from an Axolotl-style YAML config.")
        {
            config, resume, resumeFrom,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var cfg = LlmTrainConfig.Load(parse.GetValue(config)!);
            using var trainer = new LlmTrainer(cfg);
            var from = parse.GetValue(resumeFrom) ?? (parse.GetValue(resume) ? "latest" : null);
            Console.WriteLine($"model {cfg.BaseModel} ({trainer.Base.ParameterCount:N0} base parameters, {trainer.Base.WeightBytes / 1e6:F1} MB stored)"
                + $"; {(cfg.Adapter ?? "full fine-tuning")}, {trainer.TrainableParameters.Sum(p => p.Param.numel()):N0} trainable parameters");
            Console.WriteLine($"{trainer.TrainRowCount} training rows, {trainer.EvalRowCount} eval rows"
                + (trainer.DroppedSamples > 0 ? $", {trainer.DroppedSamples} samples longer than sequence_len dropped" : "")
                + $"; {trainer.TotalSteps} optimizer steps");
            LlmTrainResult? result = null;
            AnsiConsole.Progress()
                .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("training", maxValue: trainer.TotalSteps);
                    task.Value = trainer.Step;
                    trainer.Progress += p =>
                    {
                        task.Value = p.Step;
                        var eval = p.EvalLoss is double e ? $" eval {e:F4} ppl {Math.Exp(e):F2}" : "";
                        task.Description = Markup.Escape($"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4} lr {p.LearningRate:G3} {p.TokensPerSecond:F0} tok/s ETA {p.Eta:hh\\:mm\\:ss}{eval}");
                        if (p.EvalLoss is double ev) AnsiConsole.MarkupLine(Markup.Escape($"step {p.Step}: eval loss {ev:F4}, perplexity {Math.Exp(ev):F3}"));
                    };
                    result = trainer.Train(from);
                });
            var r = result!;
            Console.WriteLine($"done: {r.Steps} steps, final loss {r.FinalLoss:F4}"
                + (r.FinalEvalLoss is double fe ? $", eval loss {fe:F4} (perplexity {Math.Exp(fe):F3})" : "") + $"; output in {r.OutputDir}");
            return 0;
        }));
        return command;
    }
}
