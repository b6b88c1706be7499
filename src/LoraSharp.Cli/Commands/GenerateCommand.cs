using System.CommandLine;
using System.Globalization;
using LoraSharp.Diffusion;
using LoraSharp.Imaging;
using LoraSharp.Text;
using Spectre.Console;
using TorchSharp;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp generate --model CKPT --prompt "… &lt;lora:style:0.8&gt;" [--negative …] [--steps 20] [--sampler "DPM++ 2M Karras"]
/// [--cfg 7] [--seed 42] [--width 512] [--height 512] [--clip-skip 2] [--batch N] [--lora-dir models/Lora] [--out DIR]
/// [--dtype fp32|bf16|fp16] [--merge-loras]</c>: txt2img the A1111 way; writes <c>NNNNN-SEED.png</c> files with A1111's
/// <c>parameters</c> text and prints their paths.
/// </summary>
public static class GenerateCommand
{
    public static Command Create()
    {
        var o = new ModelOptions();
        var prompt = new Option<string>("--prompt", "-p") { Description = "Prompt (A1111 syntax: (emphasis:1.2), [less], BREAK, <lora:NAME:WEIGHT>, <lora:NAME:TE:UNET>, lbw=PRESET|w1,…).", Required = true };
        var batch = new Option<int>("--batch") { Description = "Images per run (seeds SEED, SEED+1, …). Default 1.", DefaultValueFactory = _ => 1 };
        var output = new Option<string>("--out", "-o") { Description = "Output folder (created if needed). Default: outputs/txt2img-images.", DefaultValueFactory = _ => "outputs/txt2img-images" };
        var command = new Command("generate", "Generate images from a prompt with a Stable Diffusion checkpoint and LoRAs (A1111 semantics).") { prompt, batch, output };
        o.AddTo(command);
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var stdout = parse.InvocationConfiguration.Output;
            var stderr = parse.InvocationConfiguration.Error;
            using var pipe = o.LoadPipeline(parse);
            var request = o.Request(parse) with { Prompt = parse.GetValue(prompt)!, BatchSize = parse.GetValue(batch) };
            using var result = Run(pipe, request, o.ShowProgress(parse, stderr), stderr);
            var folder = parse.GetValue(output)!;
            var files = SaveImages(result, folder);
            foreach (var f in files) stdout.WriteLine(f);
            ReportTimes(result, stderr);
            return 0;
        }));
        return command;
    }

    /// <summary>Runs the pipeline with a Spectre.Console progress bar on stderr (when it is a terminal) or silently.</summary>
    internal static Txt2ImgResult Run(Txt2ImgPipeline pipe, Txt2ImgRequest request, bool progress, TextWriter stderr, string? label = null)
    {
        if (!progress) return pipe.Generate(request);
        Txt2ImgResult? result = null;
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stderr) });
        console.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask(Markup.Escape(label ?? $"{request.Sampler}, {request.Steps} steps"), maxValue: request.Steps);
                result = pipe.Generate(request, new InlineProgress<StepInfo>(s => task.Value = s.Step));
            });
        return result!;
    }

    /// <summary>Saves each image as <c>NNNNN-SEED.png</c> (A1111's numbering: one more than the highest number in the folder).</summary>
    internal static IReadOnlyList<string> SaveImages(Txt2ImgResult result, string folder)
    {
        Directory.CreateDirectory(folder);
        int next = NextSequenceNumber(folder);
        var files = new List<string>();
        for (int i = 0; i < result.Seeds.Count; i++)
        {
            var path = Path.GetFullPath(Path.Combine(folder, $"{next + i:00000}-{result.Seeds[i]}.png"));
            using var image = result.Images!.narrow(0, i, 1);
            PngImage.Save(image, path, result.Parameters[i]);
            files.Add(path);
        }
        return files;
    }

    /// <summary>A1111's get_next_sequence_number: 1 + the largest leading number of a file name "NNNNN-…" in the folder (0 when none).</summary>
    internal static int NextSequenceNumber(string folder)
    {
        int result = -1;
        foreach (var file in Directory.EnumerateFiles(folder))
        {
            var name = Path.GetFileName(file);
            int dash = name.IndexOf('-');
            if (dash > 0 && int.TryParse(name[..dash], NumberStyles.None, CultureInfo.InvariantCulture, out var n)) result = Math.Max(result, n);
        }
        return result + 1;
    }

    internal static void ReportTimes(Txt2ImgResult result, TextWriter stderr)
    {
        if (result.StepTimes.Count == 0) return;
        var sorted = result.StepTimes.Select(t => t.TotalSeconds).Order().ToList();
        stderr.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{result.StepTimes.Count} steps, median {sorted[sorted.Count / 2]:F2} s/step; LoRAs: {(result.Loras.Count == 0 ? "none" : string.Join(", ", result.Loras.Select(l => $"{l.Name} (te {l.TextEncoderWeight}, unet {l.UNetWeight}{(l.BlockWeights is null ? "" : ", lbw " + l.BlockWeights)})")))}"));
    }

    sealed class InlineProgress<T>(Action<T> action) : IProgress<T>
    {
        public void Report(T value) => action(value);
    }
}

/// <summary>The model, sampling and LoRA options shared by <c>generate</c> and <c>grid</c>.</summary>
internal sealed class ModelOptions
{
    public readonly Option<string> Model = new("--model", "-m") { Description = "Checkpoint: diffusers folder or single file (.safetensors, .ckpt).", Required = true };
    public readonly Option<string> Negative = new("--negative", "-n") { Description = "Negative prompt.", DefaultValueFactory = _ => "" };
    public readonly Option<int> Steps = new("--steps") { Description = "Sampling steps. Default 20.", DefaultValueFactory = _ => 20 };
    public readonly Option<string> Sampler = new("--sampler") { Description = $"Sampler: {string.Join(", ", Samplers.Names)}. Default DPM++ 2M Karras.", DefaultValueFactory = _ => "DPM++ 2M Karras" };
    public readonly Option<double> Cfg = new("--cfg") { Description = "CFG scale. Default 7.", DefaultValueFactory = _ => 7.0 };
    public readonly Option<long> Seed = new("--seed") { Description = "Seed (-1 = random). Default -1.", DefaultValueFactory = _ => -1L };
    public readonly Option<int> Width = new("--width", "-W") { Description = "Width in pixels (multiple of 8). Default 512.", DefaultValueFactory = _ => 512 };
    public readonly Option<int> Height = new("--height", "-H") { Description = "Height in pixels (multiple of 8). Default 512.", DefaultValueFactory = _ => 512 };
    public readonly Option<int> ClipSkip = new("--clip-skip") { Description = "A1111 clip skip (SD1.x). Default 1.", DefaultValueFactory = _ => 1 };
    public readonly Option<string> LoraDir = new("--lora-dir") { Description = "LoRA folder (searched recursively; names are file stems). Default models/Lora.", DefaultValueFactory = _ => LoraLibrary.DefaultFolder };
    public readonly Option<string> DType = new("--dtype") { Description = "Compute dtype of the networks: fp32, bf16 or fp16. Default fp32.", DefaultValueFactory = _ => "fp32" };
    public readonly Option<bool> Merge = new("--merge-loras") { Description = "Merge LoRAs into the weights (A1111's default weight patching; re-merged only when the LoRA set changes) instead of running them unmerged." };
    public readonly Option<string?> Tokenizer = new("--tokenizer") { Description = "Tokenizer folder (vocab.json + merges.txt or bpe_simple_vocab_16e6.txt.gz). Default: the model's tokenizer/ folder, or tokenizer/ next to a single file." };
    public readonly Option<string?> Config = new("--config") { Description = "Diffusers folder whose config.json files (and scheduler config) describe a single-file checkpoint." };
    public readonly Option<string?> Prediction = new("--prediction") { Description = "epsilon or v (v-prediction, SD2 768-v). Default: the model's scheduler config, else epsilon." };
    public readonly Option<string?> LbwPresets = new("--lbw-presets") { Description = "LoRA Block Weight preset file (lbwpresets.txt format NAME:w1,…); adds to the built-in presets." };
    public readonly Option<bool> NoProgress = new("--no-progress") { Description = "Do not show the progress bar." };
    public readonly Option<string?> Vae = new("--vae") { Description = "Standalone VAE (.vae.safetensors / .vae.pt in ldm names, or a diffusers vae folder) replacing the checkpoint's (A1111 \"SD VAE\")." };

    public void AddTo(Command command)
    {
        foreach (var option in new Option[] { Model, Negative, Steps, Sampler, Cfg, Seed, Width, Height, ClipSkip, LoraDir, DType, Merge, Tokenizer, Config, Prediction, LbwPresets, NoProgress, Vae })
            command.Options.Add(option);
    }

    public bool ShowProgress(ParseResult parse, TextWriter stderr) =>
        !parse.GetValue(NoProgress) && ReferenceEquals(stderr, Console.Error) && !Console.IsErrorRedirected;

    public Txt2ImgPipeline LoadPipeline(ParseResult parse, bool loraDirRequired = false)
    {
        var loraDir = parse.GetValue(LoraDir)!;
        bool explicitLoraDir = parse.GetResult(LoraDir) is { Implicit: false };
        if (!Directory.Exists(loraDir) && (explicitLoraDir || loraDirRequired))
            throw new LoraSharpException("LoRA folder not found", Path.GetFullPath(loraDir), "--lora-dir");
        var pipe = Txt2ImgPipeline.Load(parse.GetValue(Model)!, new Txt2ImgLoadOptions
        {
            DType = ParseDType(parse.GetValue(DType)!),
            TokenizerFolder = parse.GetValue(Tokenizer),
            ConfigFolder = parse.GetValue(Config),
            LoraFolder = Directory.Exists(loraDir) ? loraDir : null,
            VaePath = parse.GetValue(Vae),
        });
        if (parse.GetValue(LbwPresets) is { } presets)
            pipe.BlockWeightPresets = LoraBlockWeight.ReadPresets(presets);
        return pipe;
    }

    public Txt2ImgRequest Request(ParseResult parse) => new()
    {
        NegativePrompt = parse.GetValue(Negative)!,
        Steps = parse.GetValue(Steps),
        Sampler = parse.GetValue(Sampler)!,
        CfgScale = parse.GetValue(Cfg),
        Seed = parse.GetValue(Seed),
        Width = parse.GetValue(Width),
        Height = parse.GetValue(Height),
        ClipSkip = parse.GetValue(ClipSkip),
        MergeLoras = parse.GetValue(Merge),
        Prediction = parse.GetValue(Prediction)?.ToLowerInvariant() switch
        {
            null => null,
            "epsilon" or "eps" => PredictionType.Epsilon,
            "v" or "v_prediction" or "v-prediction" => PredictionType.VPrediction,
            var other => throw new LoraSharpException($"unknown prediction type '{other}' (expected epsilon or v)", key: "--prediction"),
        },
        Emphasis = EmphasisMode.Original,
    };

    static torch.ScalarType ParseDType(string name) => name.ToLowerInvariant() switch
    {
        "fp32" or "f32" or "float32" or "float" => torch.ScalarType.Float32,
        "bf16" or "bfloat16" => torch.ScalarType.BFloat16,
        "fp16" or "f16" or "float16" or "half" => torch.ScalarType.Float16,
        _ => throw new LoraSharpException($"unknown dtype '{name}' (expected fp32, bf16 or fp16)", key: "--dtype"),
    };
}
