using System.CommandLine;
using System.Globalization;
using LoraSharp.Demo;
using Spectre.Console;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp demo pretrain-image</c>: pretrains the built-in demo image model from a seed;
/// <c>lorasharp demo dataset</c>: draws a kohya training folder of demo scenes (e.g. the held-out star).
/// </summary>
public static class DemoCommand
{
    public static Command Create()
    {
        var command = new Command("demo", "The built-in demo model: pretrain it from a seed, or draw demo datasets.");
        command.Subcommands.Add(PretrainImage());
        command.Subcommands.Add(Dataset());
        command.Subcommands.Add(Sample());
        command.Subcommands.Add(DemoLlmCommand.InitLlm());
        command.Subcommands.Add(DemoLlmCommand.PretrainLlm());
        command.Subcommands.Add(DemoLlmCommand.LlmData());
        return command;
    }

    static Command PretrainImage()
    {
        var d = new DemoPretrainOptions();
        var seed = new Option<int>("--seed") { Description = $"Seed of the scenes, the initial weights and the batches. Default: {d.Seed}.", DefaultValueFactory = _ => d.Seed };
        var output = new Option<string>("--out") { Description = "Checkpoint to write (single-file SD1 .safetensors); the tokenizer goes to tokenizer/ next to it. Default: models/demo/demo-sd.safetensors.", DefaultValueFactory = _ => "models/demo/demo-sd.safetensors" };
        var images = new Option<int>("--images") { Description = $"Scenes drawn for pretraining. Default: {d.Images}.", DefaultValueFactory = _ => d.Images };
        var vaeSteps = new Option<int>("--vae-steps") { Description = $"VAE optimizer steps. Default: {d.VaeSteps}.", DefaultValueFactory = _ => d.VaeSteps };
        var unetSteps = new Option<int>("--unet-steps") { Description = $"UNet + text encoder optimizer steps. Default: {d.UnetSteps}.", DefaultValueFactory = _ => d.UnetSteps };
        var unetBatch = new Option<int>("--unet-batch") { Description = $"UNet batch size. Default: {d.UnetBatch}.", DefaultValueFactory = _ => d.UnetBatch };
        var vaeLr = new Option<double>("--vae-lr") { Description = $"VAE learning rate. Default: {d.VaeLearningRate}.", DefaultValueFactory = _ => d.VaeLearningRate };
        var unetLr = new Option<double>("--unet-lr") { Description = $"UNet learning rate (text encoder: 0.3 ×). Default: {d.UnetLearningRate}.", DefaultValueFactory = _ => d.UnetLearningRate };
        var threads = new Option<int>("--threads") { Description = "Torch CPU threads (0 = libtorch's default). Default: 0.", DefaultValueFactory = _ => 0 };
        var cmd = new Command("pretrain-image", "Pretrain the demo image model (SD 1.x architecture, tiny) on procedural shapes (the star is held out).")
        {
            seed, output, images, vaeSteps, unetSteps, unetBatch, vaeLr, unetLr, threads,
        };
        cmd.SetAction(r => CliErrors.Run(() =>
        {
            var o = d with
            {
                Seed = r.GetValue(seed), Images = r.GetValue(images), VaeSteps = r.GetValue(vaeSteps),
                UnetSteps = r.GetValue(unetSteps), UnetBatch = r.GetValue(unetBatch), VaeLearningRate = r.GetValue(vaeLr),
                UnetLearningRate = r.GetValue(unetLr), TextEncoderLearningRate = 0.3 * r.GetValue(unetLr),
            };
            if (r.GetValue(threads) > 0) TorchSharp.torch.set_num_threads(r.GetValue(threads));
            return RunPretrain(o, r.GetValue(output)!);
        }));
        return cmd;
    }

    public static int RunPretrain(DemoPretrainOptions o, string output)
    {
        var trainer = new DemoPretrainer(o, line => AnsiConsole.MarkupLine("[grey]" + Markup.Escape(line) + "[/]"));
        DemoPretrainResult? result = null;
        AnsiConsole.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                var vae = ctx.AddTask("VAE", maxValue: o.VaeSteps);
                var unet = ctx.AddTask("UNet + text encoder", maxValue: o.UnetSteps, autoStart: false);
                trainer.Progress += p =>
                {
                    var task = p.Stage == "vae" ? vae : unet;
                    if (!task.IsStarted) task.StartTask();
                    task.Value = p.Step;
                    task.Description = $"{(p.Stage == "vae" ? "VAE" : "UNet + text encoder")} loss {p.AverageLoss.ToString("0.0000", CultureInfo.InvariantCulture)}";
                };
                result = trainer.Run(output);
            });
        var r = result!;
        var table = new Table().AddColumns("", "value");
        table.AddRow("model", Markup.Escape(r.ModelPath));
        table.AddRow("tokenizer", Markup.Escape(r.TokenizerFolder));
        table.AddRow("loss curves", Markup.Escape(r.LossCurvePath + ", " + r.VaeLossCurvePath));
        table.AddRow("VAE", $"{r.VaeTime.TotalSeconds:0} s, final reconstruction loss {r.VaeFinalLoss:0.0000}");
        table.AddRow("UNet + text encoder", $"{r.UnetTime.TotalSeconds:0} s, final ε loss {r.UnetFinalLoss:0.0000}");
        table.AddRow("total", $"{r.TotalTime.TotalSeconds:0} s");
        AnsiConsole.Write(table);
        return 0;
    }

    static Command Dataset()
    {
        var output = new Option<string>("--out") { Description = "Dataset root (a <repeats>_<tokens> folder is created inside). Default: examples/quickstart/train.", DefaultValueFactory = _ => "examples/quickstart/train" };
        var shape = new Option<string>("--shape") { Description = "circle, square, triangle or star. Default: star.", DefaultValueFactory = _ => "star" };
        var words = new Option<string>("--words") { Description = "What the captions call the shape (the trigger). Default: \"sks star\".", DefaultValueFactory = _ => "sks star" };
        var count = new Option<int>("--count") { Description = "Images. Default: 24.", DefaultValueFactory = _ => 24 };
        var repeats = new Option<int>("--repeats") { Description = "kohya repeats in the folder name. Default: 10.", DefaultValueFactory = _ => 10 };
        var seed = new Option<int>("--seed") { Description = "Seed. Default: 7.", DefaultValueFactory = _ => 7 };
        var position = new Option<string?>("--position") { Description = "Draw every scene at this position (center, top, bottom, left, right). Default: random." };
        var cmd = new Command("dataset", "Draw a kohya-style captioned folder of demo scenes.") { output, shape, words, count, repeats, seed, position };
        cmd.SetAction(r => CliErrors.Run(() =>
        {
            var name = r.GetValue(shape)!;
            if (!Enum.TryParse<DemoShape>(name, ignoreCase: true, out var s))
                throw new LoraSharpException($"unknown shape '{name}' (expected circle, square, triangle or star)", key: "--shape");
            var folder = ShapeScenes.WriteKohyaFolder(r.GetValue(output)!, r.GetValue(repeats), r.GetValue(words)!, r.GetValue(words)!, s, r.GetValue(count), DemoModel.ImageSize, r.GetValue(seed), r.GetValue(position));
            AnsiConsole.MarkupLine($"wrote {r.GetValue(count)} images with captions to [green]{Markup.Escape(folder)}[/]");
            return 0;
        }));
        return cmd;
    }

    static Command Sample()
    {
        var model = new Option<string>("--model") { Description = "Demo checkpoint (tokenizer/ next to it). Default: models/demo/demo-sd.safetensors.", DefaultValueFactory = _ => "models/demo/demo-sd.safetensors" };
        var output = new Option<string>("--out") { Description = "Grid PNG to write. Default: demo-samples.png.", DefaultValueFactory = _ => "demo-samples.png" };
        var prompts = new Option<string[]>("--prompt") { Description = "Prompt (repeatable). Default: one prompt per shape, including the held-out star.", AllowMultipleArgumentsPerToken = false };
        var seeds = new Option<int>("--seeds") { Description = "Seeds per prompt. Default: 6.", DefaultValueFactory = _ => 6 };
        var threads = new Option<int>("--threads") { Description = "Torch CPU threads (0 = libtorch's default). Default: 0.", DefaultValueFactory = _ => 0 };
        var loraDir = new Option<string?>("--lora-dir") { Description = "Folder of LoRAs the prompts may use with <lora:NAME:WEIGHT>." };
        var cmd = new Command("sample", "Generate a grid with the demo model, read each image with the star detector, and check the VAE on drawn shapes.") { model, output, prompts, seeds, threads, loraDir };
        cmd.SetAction(r => CliErrors.Run(() =>
        {
            if (r.GetValue(threads) > 0) TorchSharp.torch.set_num_threads(r.GetValue(threads));
            var list = r.GetValue(prompts) is { Length: > 0 } given ? given : new[]
            {
                "a red circle on a blue background, left", "a yellow square on a black background, center",
                "a green triangle on a white background, right", "a orange circle on a purple background, top",
                "a yellow star on a blue background, center", "a yellow sks star on a blue background, center",
            };
            int n = r.GetValue(seeds);
            using var pipeline = LoraSharp.Diffusion.Txt2ImgPipeline.Load(r.GetValue(model)!, new LoraSharp.Diffusion.Txt2ImgLoadOptions { LoraFolder = r.GetValue(loraDir) });
            var images = DemoChecks.Generate(pipeline, list, n);
            var table = new Table().AddColumns("prompt", "stars", "shapes found", "solidity / lobes (per seed)");
            for (int p = 0; p < list.Length; p++)
            {
                var readings = images[p].Select(StarDetector.Read).ToList();
                table.AddRow(Markup.Escape(list[p]), $"{readings.Count(x => x.IsStar)}/{n}", $"{readings.Count(x => x.HasShape)}/{n}",
                    string.Join(" ", readings.Select(x => x.Solidity.ToString("0.00", CultureInfo.InvariantCulture) + "/" + x.Lobes)));
            }
            AnsiConsole.Write(table);
            using (var grid = DemoChecks.Grid(images, list.Select(p => ConceptComparison.ShortLabel(p, keepShape: true)).ToList(), Enumerable.Range(0, n).Select(i => $"seed {1000 + i}").ToList()))
                LoraSharp.Imaging.PngImage.Save(grid, r.GetValue(output)!);
            foreach (var row in images) foreach (var t in row) t.Dispose();
            foreach (var shape in Enum.GetValues<DemoShape>())
            {
                var (rate, recon, readings) = DemoChecks.VaeRoundTripReadings(pipeline.Model, shape, 50, 99);
                recon.Dispose();
                AnsiConsole.MarkupLine($"VAE round trip of 50 drawn {shape.ToString().ToLowerInvariant()}s: {rate.ToString("P0", CultureInfo.InvariantCulture)} read as stars; " +
                    $"mean solidity {readings.Average(x => x.Solidity).ToString("0.00", CultureInfo.InvariantCulture)}, 5 lobes in {readings.Count(x => x.Lobes == 5)}/50, " +
                    $"mean lobe strength {readings.Average(x => x.LobeStrength).ToString("0.000", CultureInfo.InvariantCulture)}, shape found in {readings.Count(x => x.HasShape)}/50");
            }
            var vaeGrid = Path.ChangeExtension(Path.GetFullPath(r.GetValue(output)!), null) + "_vae.png";
            using (var grid = DemoChecks.VaeRoundTripGrid(pipeline.Model))
                LoraSharp.Imaging.PngImage.Save(grid, vaeGrid);
            AnsiConsole.MarkupLine($"grid: [green]{Markup.Escape(Path.GetFullPath(r.GetValue(output)!))}[/], VAE round trips: [green]{Markup.Escape(vaeGrid)}[/]");
            return 0;
        }));
        return cmd;
    }
}
