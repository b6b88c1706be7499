using System.CommandLine;
using System.Globalization;
using LoraSharp.Demo;
using Spectre.Console;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp quickstart</c>: trains a LoRA that teaches the demo model a shape it never saw ("sks star"), then writes a
/// before/after grid and prints how often each model draws a star.
/// </summary>
public static class QuickstartCommand
{
    public static Command Create()
    {
        var config = new Option<string>("--config") { Description = "kohya-style TOML. Default: examples/quickstart/quickstart.toml.", DefaultValueFactory = _ => Path.Combine("examples", "quickstart", "quickstart.toml") };
        var root = new Option<string?>("--root") { Description = "Repository root for relative paths. Default: found from the working directory." };
        var output = new Option<string?>("--out") { Description = "Output folder (overrides output_dir of the TOML: quickstart-output)." };
        var steps = new Option<int?>("--steps") { Description = "Override max_train_steps of the TOML." };
        var seeds = new Option<int>("--seeds") { Description = "Seeds per evaluation prompt (4 prompts). Default: 6.", DefaultValueFactory = _ => 6 };
        var threads = new Option<int>("--threads") { Description = "Torch CPU threads (0 = libtorch's default; 1 is much faster on a crowded machine). Default: 0.", DefaultValueFactory = _ => 0 };
        var sampler = new Option<string>("--sampler") { Description = "Sampler of the evaluation images (A1111 name). Default: DDIM.", DefaultValueFactory = _ => "DDIM" };
        var sampleSteps = new Option<int>("--sample-steps") { Description = "Sampling steps of the evaluation images. Default: 25.", DefaultValueFactory = _ => 25 };
        var cfg = new Option<double>("--cfg") { Description = "CFG scale of the evaluation images. Default: 5.", DefaultValueFactory = _ => 5 };
        var prompts = new Option<string[]>("--prompt") { Description = "Evaluation prompt (repeatable; the LoRA arm appends <lora:NAME:1>). Default: four scenes with the trigger \"sks star\"." };
        var lora = new Option<string?>("--lora") { Description = "Evaluate this adapter file instead of training one." };
        var command = new Command("quickstart", "Train a LoRA that teaches the built-in demo model a new shape, then compare base and LoRA images.")
        {
            config, root, output, steps, seeds, threads, cfg, lora, prompts, sampler, sampleSteps,
        };
        command.SetAction(r => CliErrors.Run(() =>
        {
            if (r.GetValue(threads) > 0) TorchSharp.torch.set_num_threads(r.GetValue(threads));
            return Run(new QuickstartOptions
            {
                ConfigPath = r.GetValue(config)!, Root = r.GetValue(root), OutputDir = r.GetValue(output), MaxTrainSteps = r.GetValue(steps), SeedsPerPrompt = r.GetValue(seeds),
                CfgScale = r.GetValue(cfg), AdapterPath = r.GetValue(lora), Sampler = r.GetValue(sampler)!, SampleSteps = r.GetValue(sampleSteps),
                Prompts = r.GetValue(prompts) is { Length: > 0 } given ? given : null,
            });
        }));
        return command;
    }

    public static int Run(QuickstartOptions options)
    {
        AnsiConsole.MarkupLine("[bold]LoraSharp quickstart[/]: the demo model ([grey]models/demo/demo-sd.safetensors[/], SD 1.x architecture, 64×64) never saw a star. " +
                               "A LoRA trained on 64 captioned images ([grey]examples/quickstart/train/10_sks star[/]) teaches it one.");
        var qs = new Quickstart(options, line => AnsiConsole.MarkupLine("[grey]" + Markup.Escape(line) + "[/]"));
        QuickstartResult? result = null;
        AnsiConsole.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                var train = ctx.AddTask("training the LoRA");
                var eval = ctx.AddTask("generating base and LoRA images", autoStart: false);
                qs.TrainProgress += p =>
                {
                    train.MaxValue = p.TotalSteps;
                    train.Value = p.Step;
                    train.Description = $"training the LoRA, loss {p.AverageLoss.ToString("0.000", CultureInfo.InvariantCulture)}";
                };
                qs.EvalProgress += (done, total) =>
                {
                    if (!eval.IsStarted) eval.StartTask();
                    train.Value = train.MaxValue;
                    eval.MaxValue = total;
                    eval.Value = done;
                };
                result = qs.Run();
            });
        var r = result!;
        var table = new Table().AddColumns("model", "images with a star");
        table.AddRow("base (no LoRA)", $"{r.Base.Stars}/{r.Base.Images} ({r.Base.Rate.ToString("P0", CultureInfo.InvariantCulture)})");
        table.AddRow("base + LoRA", $"{r.Lora.Stars}/{r.Lora.Images} ({r.Lora.Rate.ToString("P0", CultureInfo.InvariantCulture)})");
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine($"mean |LoRA image − base image| = {r.MeanAbsoluteDifference.ToString("0.000", CultureInfo.InvariantCulture)} (pixels in [[−1, 1]])");
        AnsiConsole.MarkupLine($"trained {r.Steps} steps in {r.TrainTime.TotalSeconds:0} s (final loss {r.FinalLoss:0.000}), evaluated in {r.EvalTime.TotalSeconds:0} s");
        AnsiConsole.MarkupLine($"LoRA:       [green]{Markup.Escape(r.AdapterPath)}[/]");
        AnsiConsole.MarkupLine($"grid:       [green]{Markup.Escape(r.GridPath)}[/]  (rows: prompts; columns: base seeds, then the same seeds with the LoRA)");
        if (r.LossCurvePath is not null) AnsiConsole.MarkupLine($"loss curve: [green]{Markup.Escape(r.LossCurvePath)}[/]");
        AnsiConsole.MarkupLine("A star = a figure (one colour region clear of the border, found by k-means of the colours) whose outline has five lobes and whose area is below 85 % of its convex hull's (StarDetector); drawn circles, squares and triangles read 0 %, drawn stars 100 %.");
        return 0;
    }
}
