using System.CommandLine;
using System.Globalization;
using LoraSharp.Training.Diffusion;
using Spectre.Console;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp train [CONFIG.toml] [--kohya_option value ...]</c>: trains a LoRA / LyCORIS adapter for Stable Diffusion
/// 1.x / 2.x / SDXL with kohya sd-scripts' option names (flags override the file). <c>--list-options</c> prints them all.
/// Exit codes: 0 trained, 2 bad configuration or data, 130 interrupted.
/// </summary>
public static class TrainCommand
{
    public static Command Create()
    {
        // CONFIG.toml and the kohya flags are parsed by SdTrainConfig (System.CommandLine would bind an unknown flag to
        // a positional argument): every token reaches the action as an unmatched token.
        var list = new Option<bool>("--list-options") { Description = "Print every option with its kind and meaning, then exit." };
        var command = new Command("train", "Train a LoRA/LyCORIS adapter for Stable Diffusion: lorasharp train [CONFIG.toml] [--kohya_option value ...].") { list };
        command.TreatUnmatchedTokensAsErrors = false;
        command.SetAction(result =>
        {
            if (result.GetValue(list))
            {
                foreach (var (name, kind, help) in SdTrainConfig.Describe()) Console.WriteLine($"--{name,-34} {kind,-12} {help}");
                return 0;
            }
            var tokens = result.UnmatchedTokens.ToList();
            string? config = tokens.Count > 0 && !tokens[0].StartsWith("--", StringComparison.Ordinal) ? tokens[0] : null;
            return CliErrors.Run(() => Run(config, config is null ? tokens : tokens.Skip(1).ToList()));
        });
        return command;
    }

    public static int Run(string? configPath, IReadOnlyList<string> flags)
    {
        var c = configPath is null ? new SdTrainConfig() : SdTrainConfig.FromToml(configPath);
        var rest = c.ApplyArgs(flags);
        if (rest.Count > 0) throw new LoraSharpException($"unexpected argument(s): {string.Join(" ", rest)} (options are --name value)");
        using var cts = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cts.Cancel(); };
        Console.CancelKeyPress += onCancel;
        try
        {
            using var trainer = new SdTrainer(c, line => AnsiConsole.MarkupLine("[grey]" + Markup.Escape(line) + "[/]"));
            SdTrainResult? result = null;
            if (Console.IsOutputRedirected)
            {
                trainer.Progress += p =>
                {
                    if (p.Step % 10 == 0 || p.Step == p.TotalSteps)
                        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epoch {p.Epoch}/{p.Epochs} step {p.Step}/{p.TotalSteps} loss {p.Loss:0.0000} (avg {p.AverageLoss:0.0000}) lr {p.LearningRate:G3} {p.StepsPerSecond:0.00} it/s ETA {p.Eta:hh\\:mm\\:ss}"));
                };
                result = trainer.Train(cts.Token);
            }
            else
            {
                AnsiConsole.Progress()
                    .AutoClear(false)
                    .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
                    .Start(ctx =>
                    {
                        var task = ctx.AddTask("loading", autoStart: true, maxValue: 1);
                        trainer.Progress += p =>
                        {
                            task.MaxValue = p.TotalSteps;
                            task.Value = p.Step;
                            task.Description = Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                                $"epoch {p.Epoch}/{p.Epochs} step {p.Step}/{p.TotalSteps} loss {p.AverageLoss:0.0000} lr {p.LearningRate:G3} {p.StepsPerSecond:0.00} it/s"));
                        };
                        result = trainer.Train(cts.Token);
                        task.Value = task.MaxValue;
                    });
            }
            AnsiConsole.MarkupLine($"[green]done[/]: {Markup.Escape(result!.AdapterPath)} ({result.Steps} steps, {result.SecondsPerStep:0.###} s/step)");
            if (result.LossCurvePath is not null) AnsiConsole.MarkupLine($"loss curve: {Markup.Escape(result.LossCurvePath)}");
            foreach (var s in result.SampleImages) AnsiConsole.MarkupLine($"sample: {Markup.Escape(s)}");
            return 0;
        }
        catch (OperationCanceledException)
        {
            Console.Error.WriteLine("interrupted");
            return 130;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
    }
}
