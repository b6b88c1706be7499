using System.CommandLine;
using System.Globalization;
using LoraSharp.Diffusion;
using LoraSharp.Imaging;
using SkiaSharp;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp grid --model CKPT --prompt "…" (--lora NAME --weights 0,0.5,1 | --loras A,B,C | --seeds 1,2,3)
/// [--rows seeds:1,2|weights:…|loras:…|samplers:…|cfg:…] --out grid.png</c>: an X/Y plot of images as one labelled PNG.
/// Every cell uses the same seed unless seeds are an axis; LoRAs stay loaded between cells (merged mode re-merges only
/// the changed weights, as A1111 does).
/// </summary>
public static class GridCommand
{
    /// <summary>One axis: a label and a change to the base request per value.</summary>
    internal sealed record Axis(string Kind, IReadOnlyList<(string Label, Func<Txt2ImgRequest, Txt2ImgRequest> Apply)> Values);

    public static Command Create()
    {
        var o = new ModelOptions();
        var prompt = new Option<string>("--prompt", "-p") { Description = "Base prompt (A1111 syntax); the axis LoRA tags are appended.", Required = true };
        var lora = new Option<string?>("--lora") { Description = "LoRA name for --weights (and rows 'weights:…')." };
        var weights = new Option<string?>("--weights") { Description = "Columns: weights of --lora, e.g. 0,0.5,1." };
        var loras = new Option<string?>("--loras") { Description = "Columns: LoRA names, each at --weight." };
        var weight = new Option<double>("--weight") { Description = "Weight of each LoRA of --loras. Default 1.", DefaultValueFactory = _ => 1.0 };
        var seeds = new Option<string?>("--seeds") { Description = "Columns: seeds, e.g. 1,2,3." };
        var rows = new Option<string?>("--rows") { Description = "Rows: KIND:v1,v2,… with KIND seeds, weights (of --lora), loras, samplers or cfg." };
        var output = new Option<string>("--out", "-o") { Description = "Output PNG file. Default grid.png.", DefaultValueFactory = _ => "grid.png" };
        var command = new Command("grid", "Render an X/Y grid (LoRA weights, LoRAs, seeds, samplers, CFG) as one labelled PNG.")
        {
            prompt, lora, weights, loras, weight, seeds, rows, output,
        };
        o.AddTo(command);
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var stdout = parse.InvocationConfiguration.Output;
            var stderr = parse.InvocationConfiguration.Error;
            string? loraName = parse.GetValue(lora);
            double loraWeight = parse.GetValue(weight);
            var columnSpecs = new[] { ("weights", parse.GetValue(weights)), ("loras", parse.GetValue(loras)), ("seeds", parse.GetValue(seeds)) }
                .Where(s => s.Item2 is not null).ToList();
            if (columnSpecs.Count != 1)
                throw new LoraSharpException("give exactly one of --weights (with --lora), --loras or --seeds for the columns", key: "--weights/--loras/--seeds");
            var columns = ParseAxis(columnSpecs[0].Item1, columnSpecs[0].Item2!, loraName, loraWeight);
            Axis? rowAxis = null;
            if (parse.GetValue(rows) is { } rowSpec)
            {
                int colon = rowSpec.IndexOf(':');
                if (colon <= 0) throw new LoraSharpException($"--rows '{rowSpec}': expected KIND:v1,v2,… (KIND seeds, weights, loras, samplers or cfg)", key: "--rows");
                rowAxis = ParseAxis(rowSpec[..colon].Trim().ToLowerInvariant(), rowSpec[(colon + 1)..], loraName, loraWeight);
                if (rowAxis.Kind == columns.Kind) throw new LoraSharpException($"rows and columns are both {columns.Kind}", key: "--rows");
            }

            var baseRequest = o.Request(parse) with { Prompt = parse.GetValue(prompt)!, KeepLorasLoaded = true };
            if (baseRequest.Seed < 0) baseRequest = baseRequest with { Seed = Random.Shared.NextInt64(0, uint.MaxValue) };
            var rowValues = rowAxis?.Values ?? [("", r => r)];
            // Check every cell's request before loading anything heavy.
            var cells = rowValues.SelectMany(r => columns.Values.Select(c => (Request: c.Apply(r.Apply(baseRequest)), Label: $"{r.Label} {c.Label}".Trim()))).ToList();

            using var pipe = o.LoadPipeline(parse, loraDirRequired: columns.Kind is "weights" or "loras" || rowAxis?.Kind is "weights" or "loras");
            var bitmaps = new List<SKBitmap>();
            GenerationParameters? first = null;
            try
            {
                foreach (var (request, label) in cells)
                {
                    using var result = GenerateCommand.Run(pipe, request, o.ShowProgress(parse, stderr), stderr, label);
                    first ??= result.Parameters[0];
                    bitmaps.Add(PngImage.ToBitmap(result.Images!));
                    GenerateCommand.ReportTimes(result, stderr);
                }
                pipe.DetachAll();
                using var grid = ImageGrid.Compose(bitmaps, rowAxis?.Values.Select(v => v.Label).ToList() ?? [], columns.Values.Select(v => v.Label).ToList());
                var path = Path.GetFullPath(parse.GetValue(output)!);
                PngImage.Save(grid, path, first);
                stdout.WriteLine(path);
            }
            finally
            {
                foreach (var b in bitmaps) b.Dispose();
            }
            return 0;
        }));
        return command;
    }

    internal static Axis ParseAxis(string kind, string values, string? loraName, double loraWeight)
    {
        var items = values.Split(',').Select(v => v.Trim()).Where(v => v.Length > 0).ToList();
        if (items.Count == 0) throw new LoraSharpException($"no values for the {kind} axis", key: kind);
        double Number(string s) => double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) && double.IsFinite(v)
            ? v : throw new LoraSharpException($"'{s}' is not a number ({kind} axis)", key: kind);
        string Format(double v) => v.ToString("0.###", CultureInfo.InvariantCulture);
        return kind switch
        {
            "weights" => new Axis(kind, items.Select(s =>
            {
                var name = loraName ?? throw new LoraSharpException("a weights axis needs --lora NAME", key: "--lora");
                var w = Number(s);
                return ($"{name}: {Format(w)}", (Func<Txt2ImgRequest, Txt2ImgRequest>)(r => r with { Prompt = $"{r.Prompt} <lora:{name}:{Format(w)}>" }));
            }).ToList()),
            "loras" => new Axis(kind, items.Select(name =>
            {
                if (LoraLibrary.ValidateName(name) is { } problem) throw new LoraSharpException($"LoRA name '{name}' refused: {problem}", key: "--loras");
                return (name, (Func<Txt2ImgRequest, Txt2ImgRequest>)(r => r with { Prompt = $"{r.Prompt} <lora:{name}:{Format(loraWeight)}>" }));
            }).ToList()),
            "seeds" => new Axis(kind, items.Select(s =>
            {
                long seed = long.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) && v >= 0
                    ? v : throw new LoraSharpException($"seed '{s}' is not a non-negative integer", key: "--seeds");
                return ($"seed {seed}", (Func<Txt2ImgRequest, Txt2ImgRequest>)(r => r with { Seed = seed }));
            }).ToList()),
            "samplers" => new Axis(kind, items.Select(s =>
            {
                using var check = Samplers.Create(s, 1);
                return (check.Name, (Func<Txt2ImgRequest, Txt2ImgRequest>)(r => r with { Sampler = s }));
            }).ToList()),
            "cfg" => new Axis(kind, items.Select(s =>
            {
                var c = Number(s);
                return ($"CFG {Format(c)}", (Func<Txt2ImgRequest, Txt2ImgRequest>)(r => r with { CfgScale = c }));
            }).ToList()),
            _ => throw new LoraSharpException($"unknown axis kind '{kind}' (expected seeds, weights, loras, samplers or cfg)", key: "--rows"),
        };
    }
}
